#!/usr/bin/env python3
"""A fake ``kubectl`` for tests: answers get/patch/get --raw from a JSON state file and records
every call (argv) as one JSON line. $FAKE_KUBE_STATE names the state, $FAKE_KUBE_CALLS the log.

State: {"objects": {"service/tureen-engine": {...}, ...}, "pods": [...],
        "raw": {"/api/v1/...": {"status": 200, "body": "..."}}}
"""

import json
import os
import sys


def main(argv: list[str]) -> int:
    with open(os.environ["FAKE_KUBE_CALLS"], "a") as log:
        log.write(json.dumps(argv) + "\n")
    state_path = os.environ["FAKE_KUBE_STATE"]
    with open(state_path) as f:
        state = json.load(f)
    args = [a for i, a in enumerate(argv) if a not in ("--namespace", "--context")
            and (i == 0 or argv[i - 1] not in ("--namespace", "--context"))]
    if args[:2] == ["get", "--raw"]:
        answer = state.get("raw", {}).get(args[2], {"status": 404, "body": "not found"})
        if answer["status"] != 200:
            print(f"Error from server: the server responded with status {answer['status']}", file=sys.stderr)
            return 1
        print(answer["body"])
        return 0
    if args[0] == "get" and args[1] == "pods":
        selector = dict(kv.split("=") for kv in args[args.index("-l") + 1].split(","))
        pods = [p for p in state.get("pods", []) if selector.items() <= p["metadata"]["labels"].items()]
        print(json.dumps({"items": pods}))
        return 0
    key = f"{args[1]}/{args[2]}"
    obj = state["objects"].get(key)
    if obj is None:
        print(f'Error from server (NotFound): {args[1]} "{args[2]}" not found', file=sys.stderr)
        return 1
    if args[0] == "get":
        print(json.dumps(obj) if "json" in args else key)
        return 0
    if args[0] == "patch":
        patch = json.loads(args[args.index("-p") + 1])
        merge(obj, patch)
        with open(state_path, "w") as f:
            json.dump(state, f)
        print(f"{key} patched")
        return 0
    print(f"fake kubectl: unsupported {argv}", file=sys.stderr)
    return 2


def merge(target: dict, patch: dict) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            merge(target[k], v)
        else:
            target[k] = v


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
