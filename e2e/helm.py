#!/usr/bin/env python3
"""A small `helm` for the testbed, over helm-sdkpy (Helm v4's library; there is no helm binary
in Debian): the commands the e2e tests and `e2e/demo` use, nothing more. Run it with the
testbed's venv python ($BLOCKSMITH_PYTHON); it talks to the cluster in $KUBECONFIG.

    helm.py lint CHART [--strict]
    helm.py template RELEASE CHART NAMESPACE [--set k=v]...   render locally, no cluster
    helm.py install RELEASE CHART NAMESPACE [--set k=v]... [--manifest-out FILE]
    helm.py uninstall RELEASE NAMESPACE
    helm.py manifest RELEASE NAMESPACE        the deployed release's rendered manifest
    helm.py notes RELEASE NAMESPACE           the release's NOTES.txt, rendered

`--set` takes helm's basic syntax: dotted keys (`a.b=1`), lists (`a={x,y}`), several pairs per
flag (`a=1,b=2`); `true`/`false`/`null` and integers are typed, everything else is a string.

Exits 0 on success; on failure prints `helm.py: <action> failed: <reason>` to stderr and exits
1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from typing import Any

try:
    import helm_sdkpy as helm
except ImportError as e:  # pragma: no cover - depends on the environment
    sys.exit(
        f"helm.py: cannot import helm_sdkpy ({e}); run e2e/scripts/install.sh, which installs "
        "it into the testbed venv, and use that python ($BLOCKSMITH_PYTHON)"
    )

# Helm's defaults for what the suite never sets.
TIMEOUT_SECONDS = 300
KUBE_VERSION = "1.20.2"


class UsageError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# --set parsing (the part of helm's strvals the suite uses)


def _split_outside_braces(s: str, sep: str) -> list[str]:
    """Split on `sep` outside `{...}`."""
    parts, cur, depth = [], [], 0
    for c in s:
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def _typed(raw: str) -> Any:
    if raw in ("true", "false", "null"):
        return json.loads(raw)
    if re.fullmatch(r"-?(0|[1-9][0-9]*)", raw):
        return int(raw)
    return raw


def _parse_value(raw: str) -> Any:
    if raw.startswith("{") and raw.endswith("}"):
        inner = raw[1:-1]
        return [_typed(x) for x in inner.split(",")] if inner else []
    return _typed(raw)


def collect_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `--set` flags as a values tree."""
    values: dict[str, Any] = {}
    for expr in args.set or []:
        for pair in _split_outside_braces(expr, ","):
            if "=" not in pair:
                raise UsageError(f"--set {pair!r}: expected key=value")
            key, raw = pair.split("=", 1)
            *parents, last = key.split(".")
            node = values
            for name in parents:
                if not isinstance(node.get(name), dict):
                    node[name] = {}
                node = node[name]
            node[last] = _parse_value(raw)
    return values


# ---------------------------------------------------------------------------------------------
# actions


def config(namespace: str) -> helm.Configuration:
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        raise UsageError("KUBECONFIG is not set (source the testbed's env file)")
    return helm.Configuration(namespace=namespace, kubeconfig=kubeconfig)


_SEVERITY = {0: "unknown", 1: "info", 2: "warning", 3: "error"}


def _lint_messages(result: Any) -> list[tuple[str, str]]:
    """(severity, text) for each lint message.

    helm-sdkpy returns Helm's lint result as JSON: {"Messages": [{"Severity": 1..3, "Path":
    ..., "Err": ...}], "Errors": [...]}; Go's error values serialize as `{}`, so the message
    text is lost and only the severity and the file remain.
    """
    out: list[tuple[str, str]] = []
    if not isinstance(result, dict):
        return out
    for m in result.get("Messages") or result.get("messages") or []:
        if not isinstance(m, dict):
            out.append(("info", str(m)))
            continue
        sev = m.get("Severity", m.get("severity", 0))
        sev = _SEVERITY.get(sev, str(sev)) if isinstance(sev, int) else str(sev).lower()
        err = m.get("Err", m.get("err"))
        text = err if isinstance(err, str) and err else (
            json.dumps(err) if err not in (None, {}) else "(helm-sdkpy drops lint message texts)"
        )
        out.append((sev, f"{m.get('Path') or m.get('path') or '?'}: {text}"))
    return out


async def cmd_lint(args: argparse.Namespace) -> int:
    chart = os.path.abspath(args.chart)
    if not os.path.isfile(os.path.join(chart, "Chart.yaml")):
        raise UsageError(f"{chart} is not a chart (no Chart.yaml)")
    # Lint needs no cluster; a configuration is still required by the library.
    cfg = helm.Configuration(namespace="default", kubeconfig=os.environ.get("KUBECONFIG"))
    result = await helm.Lint(cfg).run(chart)
    msgs = _lint_messages(result)
    for sev, text in msgs:
        print(f"[{sev.upper()}] {text}")
    errors = [m for m in msgs if m[0] == "error"]
    warnings = [m for m in msgs if m[0] == "warning"]
    failed = bool(errors) or (args.strict and bool(warnings))
    if isinstance(result, dict) and (result.get("Errors") or result.get("errors")):
        failed = True
    if failed:
        print(
            f"helm.py: lint failed: {len(errors)} error(s), {len(warnings)} warning(s) in {chart}",
            file=sys.stderr,
        )
        return 1
    print(f"1 chart(s) linted, 0 chart(s) failed ({len(warnings)} warning(s))")
    return 0


async def cmd_install(args: argparse.Namespace) -> int:
    values = collect_values(args)
    cfg = config(args.namespace)
    result = await helm.Install(cfg).run(
        args.release,
        os.path.abspath(args.chart),
        values=values or None,
        create_namespace=False,
        wait=False,
        timeout=TIMEOUT_SECONDS,
    )
    if args.manifest_out:
        with open(args.manifest_out, "w") as f:
            f.write(result.get("manifest", ""))
    info = result.get("info") or {}
    status = info.get("status") if isinstance(info, dict) else result.get("status")
    print(json.dumps({"name": result.get("name"), "namespace": result.get("namespace"),
                      "version": result.get("version"), "status": status}))
    return 0


async def cmd_uninstall(args: argparse.Namespace) -> int:
    cfg = config(args.namespace)
    result = await helm.Uninstall(cfg).run(args.release, wait=True, timeout=TIMEOUT_SECONDS)
    info = result.get("info") if isinstance(result, dict) else None
    print(f'release "{args.release}" uninstalled')
    if isinstance(info, str) and info:
        print(info)
    return 0


async def _status(args: argparse.Namespace) -> dict[str, Any]:
    return await helm.Status(config(args.namespace)).run(args.release)


async def cmd_manifest(args: argparse.Namespace) -> int:
    manifest = (await _status(args)).get("manifest")
    if manifest is None:
        raise helm.ReleaseError(f"release {args.release} has no manifest in its status")
    sys.stdout.write(manifest)
    return 0


async def cmd_notes(args: argparse.Namespace) -> int:
    info = (await _status(args)).get("info") or {}
    sys.stdout.write((info.get("notes") if isinstance(info, dict) else "") or "")
    return 0


# ---------------------------------------------------------------------------------------------
# template: helm-sdkpy has no `helm template` (nor a dry run), so render by installing into a
# stand-in API server that lives in this process and forgets everything when it exits. Nothing
# reaches a real cluster. It serves discovery for the kinds charts commonly use, stores what is
# created, answers 404 for what is not there and 409 for CRDs (so Helm skips them, as it does
# on a cluster where they exist: crds/ are never part of a release manifest anyway).

_KINDS: dict[tuple[str, str], list[tuple[str, str, bool]]] = {
    ("", "v1"): [
        ("namespaces", "Namespace", False),
        ("serviceaccounts", "ServiceAccount", True),
        ("services", "Service", True),
        ("secrets", "Secret", True),
        ("configmaps", "ConfigMap", True),
    ],
    ("apps", "v1"): [("deployments", "Deployment", True)],
    ("rbac.authorization.k8s.io", "v1"): [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
    ],
    ("apiregistration.k8s.io", "v1"): [("apiservices", "APIService", False)],
    ("apiextensions.k8s.io", "v1"): [("customresourcedefinitions", "CustomResourceDefinition", False)],
    # The Prometheus Operator's, for the chart's monitoring options.
    ("monitoring.coreos.com", "v1"): [
        ("servicemonitors", "ServiceMonitor", True),
        ("podmonitors", "PodMonitor", True),
        ("prometheusrules", "PrometheusRule", True),
    ],
    # cert-manager's, for the external metrics certificate.
    ("cert-manager.io", "v1"): [("certificates", "Certificate", True)],
}


def _standin_server(kube_version: str):
    import http.server
    import threading
    import uuid

    major, minor = kube_version.lstrip("v").split(".")[:2]
    store: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}

    def discovery(path: str) -> dict[str, Any] | None:
        if path == "/version":
            return {"major": major, "minor": minor, "gitVersion": f"v{kube_version.lstrip('v')}",
                    "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups: dict[str, list[str]] = {}
            for g, v in _KINDS:
                if g:
                    groups.setdefault(g, []).append(v)
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in groups.items()]}
        parts = path.strip("/").split("/")
        gv = None
        if parts == ["api", "v1"]:
            gv = ("", "v1")
        elif len(parts) == 3 and parts[0] == "apis":
            gv = (parts[1], parts[2])
        if gv is None or gv not in _KINDS:
            return None
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": "/".join(x for x in gv if x),
                "resources": [{"name": r, "singularName": "", "namespaced": ns, "kind": k, "verbs": verbs}
                              for r, k, ns in _KINDS[gv]]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            if os.environ.get("HELM_PY_DEBUG"):
                import time
                sys.stderr.write(f"{time.monotonic():.3f} standin: {a[0] % a[1:]}\n")

        def reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self) -> dict[str, Any] | None:
            """The JSON body; None for protobuf (Helm's release records), which is not kept."""
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n)
            if "json" not in (self.headers.get("Content-Type") or "application/json"):
                return None
            return json.loads(raw or b"{}")

        def do_GET(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            d = discovery(path)
            if d is not None:
                return self.reply(200, d)
            with lock:
                if path in store:
                    return self.reply(200, store[path])
                items = [o for k, o in store.items() if k.rsplit("/", 1)[0] == path]
            last = path.rsplit("/", 1)[-1]
            if any(last == r for rs in _KINDS.values() for r, _, _ in rs):
                return self.reply(200, {"kind": "List", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": "1"}, "items": items})
            self.reply(404, status(404, "NotFound", f"{path} not found"))

        def do_POST(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            obj = self.body()
            if obj is None:
                return self.reply(201, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            meta = obj.setdefault("metadata", {})
            if obj.get("kind") == "CustomResourceDefinition":
                return self.reply(409, status(409, "AlreadyExists", "stand-in: CRDs are not stored"))
            key = f"{path}/{meta.get('name')}"
            with lock:
                if key in store:
                    return self.reply(409, status(409, "AlreadyExists", f"{key} already exists"))
                meta.setdefault("uid", str(uuid.uuid4()))
                meta["resourceVersion"] = "1"
                meta.setdefault("creationTimestamp", "2000-01-01T00:00:00Z")
                store[key] = obj
            self.reply(201, obj)

        def do_PUT(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            obj = self.body()
            if obj is None:
                return self.reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
            with lock:
                store[path] = obj
            self.reply(200, obj)

        def do_PATCH(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            self.body()
            with lock:
                obj = store.get(path)
            if obj is None:
                return self.reply(404, status(404, "NotFound", f"{path} not found"))
            self.reply(200, obj)

        def do_DELETE(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            with lock:
                store.pop(path, None)
            self.reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def cmd_template(args: argparse.Namespace) -> int:
    values = collect_values(args)
    import tempfile

    server = _standin_server(KUBE_VERSION)
    tmp = tempfile.NamedTemporaryFile("w", prefix="helm-standin-", suffix=".kubeconfig")
    try:
        json.dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
            "users": [{"name": "standin", "user": {"token": "standin"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                         "namespace": args.namespace}}],
        }, tmp)
        tmp.flush()
        cfg = helm.Configuration(namespace=args.namespace, kubeconfig=tmp.name)
        result = await helm.Install(cfg).run(
            args.release, os.path.abspath(args.chart), values=values or None, wait=False
        )
    finally:
        server.shutdown()
        tmp.close()
    sys.stdout.write(result.get("manifest", ""))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="helm.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("lint", help="lint a chart")
    s.add_argument("chart")
    s.add_argument("--strict", action="store_true", help="fail on warnings too")
    s.set_defaults(func=cmd_lint)

    for name, func, help in (
        ("template", cmd_template, "render a chart locally (no cluster involved)"),
        ("install", cmd_install, "install a release"),
    ):
        s = sub.add_parser(name, help=help)
        s.add_argument("release")
        s.add_argument("chart")
        s.add_argument("namespace")
        s.add_argument("--set", action="append", metavar="K=V")
        if name == "install":
            s.add_argument("--manifest-out", metavar="FILE", help="write the rendered manifest here")
        s.set_defaults(func=func)

    for name, func in (
        ("uninstall", cmd_uninstall),
        ("manifest", cmd_manifest),
        ("notes", cmd_notes),
    ):
        s = sub.add_parser(name, help=f"{name} a release")
        s.add_argument("release")
        s.add_argument("namespace")
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(args.func(args))
    except UsageError as e:
        print(f"helm.py: {args.command}: {e}", file=sys.stderr)
        return 2
    except helm.HelmError as e:
        print(f"helm.py: {args.command} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `helm.py manifest ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
