"""``tureen deploy``: operate a deployment made from deploy/kubernetes. One subcommand: ``switch``."""

from __future__ import annotations

import argparse
import sys

from tureen.deploy.kubectl import Kubectl, KubectlError
from tureen.deploy.switch import SwitchPlan, switch

EXIT_REFUSED = 1
EXIT_ERROR = 2


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("deploy", help="Operate a Kubernetes deployment (blue-green switch).",
                                   description="Operate a tureen deployment made from deploy/kubernetes.")
    sub = parser.add_subparsers(dest="deploy_command", metavar="COMMAND", required=True)
    sw = sub.add_parser(
        "switch", help="Move the engine Service to the blue or green Deployment, if that colour is healthy.",
        description="Point the engine Service (and its KEDA ScaledObject or HPA) at the other colour. Refuses "
                    "(exit 1) unless every replica of the target Deployment is updated and Ready and each pod "
                    "passes GET /health?deep=1 through the API server proxy. Roll back with the other colour.")
    sw.add_argument("--to", required=True, choices=["blue", "green"], help="The colour to send traffic to.")
    sw.add_argument("--namespace", "-n", default="tureen", help="Namespace of the deployment (default: tureen).")
    sw.add_argument("--context", default=None, help="kubeconfig context (default: the current one).")
    sw.add_argument("--service", default="tureen-engine", help="The engine Service (default: tureen-engine).")
    sw.add_argument("--deployment-prefix", default="tureen-engine-",
                    help="Deployments are PREFIX + colour (default: tureen-engine-).")
    sw.add_argument("--color-label", default="tureen.dev/color", help="Selector label holding the colour.")
    sw.add_argument("--scaled-object", default="tureen-engine", help="KEDA ScaledObject to retarget, if present.")
    sw.add_argument("--hpa", default="tureen-engine", help="HorizontalPodAutoscaler to retarget, if present.")
    sw.add_argument("--port", type=int, default=8000, help="The engine container's port (default: 8000).")
    sw.add_argument("--kubectl", default="kubectl", help="The kubectl binary (default: kubectl on PATH).")
    sw.add_argument("--dry-run", action="store_true", help="Run the checks, change nothing.")
    sw.set_defaults(func=run_switch)
    return parser


def run_switch(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    kubectl = Kubectl(namespace=args.namespace, binary=args.kubectl, context=args.context)
    plan = SwitchPlan(to=args.to, service=args.service, deployment_prefix=args.deployment_prefix,
                      color_label=args.color_label, scaled_object=args.scaled_object, hpa=args.hpa, port=args.port)
    try:
        result = switch(kubectl, plan, dry_run=args.dry_run)
    except KubectlError as exc:
        print(f"tureen deploy switch: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if result.problems:
        console.print(f"[bold red]refused[/]: {plan.deployment} cannot take traffic yet")
        for problem in result.problems:
            console.print(f"  - {problem}")
        return EXIT_REFUSED
    for action in result.actions:
        console.print(f"[green]ok[/] {action}")
    if result.switched and result.previous:
        console.print(f"roll back with: tureen deploy switch --to {result.previous} --namespace {args.namespace}")
    return 0
