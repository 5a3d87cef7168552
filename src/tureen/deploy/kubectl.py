"""A thin, typed wrapper over the ``kubectl`` binary: the one place that shells out to it.

Going through kubectl (rather than a Kubernetes client library) means the user's kubeconfig,
context, credentials plugins and proxies work exactly as they do on their command line.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

from tureen.errors import TureenError


class KubectlError(TureenError):
    """kubectl failed (not found, no cluster, no permission, unknown object)."""


@dataclass(frozen=True)
class Kubectl:
    namespace: str
    binary: str = "kubectl"
    context: str | None = None
    timeout_s: float = 60.0

    def _cmd(self, *args: str) -> list[str]:
        cmd = [self.binary, "--namespace", self.namespace]
        if self.context:
            cmd += ["--context", self.context]
        return cmd + list(args)

    def run(self, *args: str) -> str:
        try:
            res = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=self.timeout_s)
        except FileNotFoundError:
            raise KubectlError(f"{self.binary!r} not found on PATH") from None
        except subprocess.TimeoutExpired:
            raise KubectlError(f"kubectl {' '.join(args[:2])} timed out after {self.timeout_s:g} s") from None
        if res.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args[:3])}: {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return json.loads(self.run("get", kind, name, "-o", "json"))

    def exists(self, kind: str, name: str) -> bool:
        try:
            self.run("get", kind, name, "-o", "name")
        except KubectlError:
            return False
        return True

    def pods(self, selector: dict[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return json.loads(self.run("get", "pods", "-l", label_selector, "-o", "json"))["items"]

    def patch(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        self.run("patch", kind, name, "--type", "merge", "-p", json.dumps(patch, separators=(",", ":")))

    def pod_get(self, pod: str, port: int, path: str) -> str:
        """GET a path on a pod through the API server's proxy (no port-forward, no in-cluster access needed)."""
        return self.run("get", "--raw", f"/api/v1/namespaces/{self.namespace}/pods/{pod}:{port}/proxy{path}")
