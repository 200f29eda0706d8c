#!/usr/bin/env python3
"""A small `helm` for the testbed, over helm-sdkpy (Helm v4's library; there is no helm binary
in Debian). Run it with the testbed's venv python ($BLOCKSMITH_PYTHON); it talks to the
cluster in $KUBECONFIG.

    helm.py lint CHART [--strict]
    helm.py install RELEASE CHART NAMESPACE [--set k=v]... [--set-string k=v]...
                    [--set-json k=JSON]... [-f values.yaml]... [--create-namespace]
                    [--wait] [--timeout SECONDS] [--manifest-out FILE]
    helm.py upgrade RELEASE CHART NAMESPACE [same options as install] [--install]
    helm.py template RELEASE CHART NAMESPACE [--set ...] [--kube-version 1.20.2]
                                              render locally, no cluster involved
    helm.py uninstall RELEASE NAMESPACE [--no-wait] [--timeout SECONDS]
    helm.py manifest RELEASE NAMESPACE        the deployed release's rendered manifest
    helm.py notes RELEASE NAMESPACE           the release's NOTES.txt, rendered
    helm.py status RELEASE NAMESPACE          the release as JSON
    helm.py list NAMESPACE

`--set` follows helm's syntax: dotted keys (`a.b=1`, `\\.` escapes a dot), list indexes
(`a[0]=x`), lists (`a={x,y}`), several pairs per flag (`a=1,b=2`); `true`/`false`/`null` and
integers are typed, everything else is a string (`--set-string` keeps strings).

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


class UsageError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# --set parsing (a subset of helm's strvals that covers what charts use)


def _split_unescaped(s: str, sep: str, keep_braces: bool = False) -> list[str]:
    """Split on `sep` outside `{...}` and not preceded by a backslash (kept in the parts)."""
    parts, cur, depth, i = [], [], 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i : i + 2])
            i += 2
            continue
        if keep_braces and c == "{":
            depth += 1
        elif keep_braces and c == "}":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _typed(raw: str) -> Any:
    if raw == "true":
        return True
    if raw == "false":
        return False
    if raw == "null":
        return None
    if re.fullmatch(r"-?(0|[1-9][0-9]*)", raw):
        return int(raw)
    return _unescape(raw)


def _parse_value(raw: str, kind: str) -> Any:
    if kind == "json":
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise UsageError(f"--set-json value {raw!r} is not JSON: {e}") from e
    if raw.startswith("{") and raw.endswith("}"):
        inner = raw[1:-1]
        items = [] if inner == "" else _split_unescaped(inner, ",")
        return [_unescape(x) if kind == "string" else _typed(x) for x in items]
    return _unescape(raw) if kind == "string" else _typed(raw)


_SEGMENT = re.compile(r"^(?P<name>.*?)((\[(?P<idx>[0-9]+)\])*)$")


def _assign(values: dict[str, Any], key: str, value: Any) -> None:
    """Sets `value` at the dotted `key` (with `[n]` indexes) inside `values`."""
    path: list[str | int] = []
    for seg in _split_unescaped(key, "."):
        m = _SEGMENT.match(seg)
        name = _unescape(m.group("name")) if m else seg
        if not name:
            raise UsageError(f"bad key {key!r}")
        path.append(name)
        path.extend(int(i) for i in re.findall(r"\[([0-9]+)\]", seg[len(m.group("name")) :]))
    node: Any = values
    for here, nxt in zip(path, path[1:]):
        empty: Any = [] if isinstance(nxt, int) else {}
        if isinstance(here, int):
            while len(node) <= here:
                node.append(None)
            if not isinstance(node[here], (dict, list)):
                node[here] = empty
            node = node[here]
        else:
            if not isinstance(node.get(here), (dict, list)):
                node[here] = empty
            node = node[here]
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
        node[last] = value
    else:
        node[last] = value


def parse_sets(values: dict[str, Any], exprs: list[str], kind: str) -> None:
    for expr in exprs:
        pairs = [expr] if kind == "json" else _split_unescaped(expr, ",", keep_braces=True)
        for pair in pairs:
            if "=" not in pair:
                raise UsageError(f"--set{'' if kind == 'typed' else '-' + kind} {pair!r}: expected key=value")
            key, raw = pair.split("=", 1)
            _assign(values, key, _parse_value(raw, kind))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def collect_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path in args.values or []:
        with open(path) as f:
            text = f.read()
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            try:
                import yaml  # optional: only for YAML values files
            except ImportError as e:
                raise UsageError(f"-f {path}: not JSON, and PyYAML is not installed for YAML") from e
            loaded = yaml.safe_load(text)
        _deep_merge(values, loaded or {})
    # Helm applies --set-json, then --set, then --set-string (later wins on the same key).
    parse_sets(values, args.set_json or [], "json")
    parse_sets(values, args.set or [], "typed")
    parse_sets(values, args.set_string or [], "string")
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


def _print_release(result: dict[str, Any], args: argparse.Namespace) -> None:
    manifest = result.get("manifest", "")
    if args.manifest_out:
        with open(args.manifest_out, "w") as f:
            f.write(manifest)
    info = result.get("info") or {}
    print(
        json.dumps(
            {
                "name": result.get("name"),
                "namespace": result.get("namespace"),
                "version": result.get("version"),
                "status": info.get("status") if isinstance(info, dict) else result.get("status"),
            }
        )
    )
    notes = info.get("notes") if isinstance(info, dict) else None
    if notes and args.notes:
        print(notes)


async def cmd_install(args: argparse.Namespace) -> int:
    values = collect_values(args)
    cfg = config(args.namespace)
    result = await helm.Install(cfg).run(
        args.release,
        os.path.abspath(args.chart),
        values=values or None,
        create_namespace=args.create_namespace,
        wait=args.wait,
        timeout=args.timeout,
    )
    _print_release(result, args)
    return 0


async def cmd_upgrade(args: argparse.Namespace) -> int:
    values = collect_values(args)
    cfg = config(args.namespace)
    result = await helm.Upgrade(cfg).run(
        args.release,
        os.path.abspath(args.chart),
        values=values or None,
        install=args.install,
        create_namespace=args.create_namespace,
        wait=args.wait,
        timeout=args.timeout,
        reset_values=True,
    )
    _print_release(result, args)
    return 0


async def cmd_uninstall(args: argparse.Namespace) -> int:
    cfg = config(args.namespace)
    result = await helm.Uninstall(cfg).run(args.release, wait=not args.no_wait, timeout=args.timeout)
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


async def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(await _status(args), indent=2, default=str))
    return 0


async def cmd_list(args: argparse.Namespace) -> int:
    releases = await helm.List(config(args.namespace)).run(all=True)
    print(json.dumps(releases or [], indent=2, default=str))
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
        ("endpoints", "Endpoints", True),
        ("secrets", "Secret", True),
        ("configmaps", "ConfigMap", True),
        ("pods", "Pod", True),
        ("events", "Event", True),
    ],
    ("apps", "v1"): [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True),
                     ("daemonsets", "DaemonSet", True)],
    ("batch", "v1"): [("jobs", "Job", True)],
    ("autoscaling", "v1"): [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    ("autoscaling", "v2beta2"): [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    ("policy", "v1beta1"): [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    ("coordination.k8s.io", "v1"): [("leases", "Lease", True)],
    ("events.k8s.io", "v1"): [("events", "Event", True)],
    ("rbac.authorization.k8s.io", "v1"): [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
    ],
    ("apiregistration.k8s.io", "v1"): [("apiservices", "APIService", False)],
    ("apiextensions.k8s.io", "v1"): [("customresourcedefinitions", "CustomResourceDefinition", False)],
    ("networking.k8s.io", "v1"): [("networkpolicies", "NetworkPolicy", True), ("ingresses", "Ingress", True)],
    ("blocksmith.io", "v1alpha1"): [("blockpipelines", "BlockPipeline", True), ("blockjobs", "BlockJob", True)],
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

    server = _standin_server(args.kube_version)
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
    if args.notes:
        info = result.get("info") or {}
        sys.stdout.write("\n---\n# NOTES.txt\n" + "".join(
            f"# {line}\n" for line in str(info.get("notes") or "").splitlines()))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="helm.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("lint", help="lint a chart")
    s.add_argument("chart")
    s.add_argument("--strict", action="store_true", help="fail on warnings too")
    s.set_defaults(func=cmd_lint)

    for name, func in (("install", cmd_install), ("upgrade", cmd_upgrade)):
        s = sub.add_parser(name, help=f"{name} a release")
        s.add_argument("release")
        s.add_argument("chart")
        s.add_argument("namespace")
        s.add_argument("--set", action="append", metavar="K=V")
        s.add_argument("--set-string", action="append", metavar="K=V")
        s.add_argument("--set-json", action="append", metavar="K=JSON")
        s.add_argument("-f", "--values", action="append", metavar="FILE")
        s.add_argument("--create-namespace", action="store_true")
        s.add_argument("--wait", action="store_true", help="wait for resources to be ready")
        s.add_argument("--timeout", type=int, default=300, metavar="SECONDS")
        s.add_argument("--manifest-out", metavar="FILE", help="write the rendered manifest here")
        s.add_argument("--notes", action="store_true", help="print the rendered NOTES.txt")
        if name == "upgrade":
            s.add_argument("--install", action="store_true", help="install if absent")
        s.set_defaults(func=func)

    s = sub.add_parser("template", help="render a chart locally (no cluster involved)")
    s.add_argument("release")
    s.add_argument("chart")
    s.add_argument("namespace")
    s.add_argument("--set", action="append", metavar="K=V")
    s.add_argument("--set-string", action="append", metavar="K=V")
    s.add_argument("--set-json", action="append", metavar="K=JSON")
    s.add_argument("-f", "--values", action="append", metavar="FILE")
    s.add_argument("--kube-version", default="1.20.2", help="the cluster version to render for")
    s.add_argument("--notes", action="store_true", help="append NOTES.txt as comments")
    s.set_defaults(func=cmd_template)

    s = sub.add_parser("uninstall", help="uninstall a release (CRDs stay)")
    s.add_argument("release")
    s.add_argument("namespace")
    s.add_argument("--no-wait", action="store_true")
    s.add_argument("--timeout", type=int, default=300, metavar="SECONDS")
    s.set_defaults(func=cmd_uninstall)

    for name, func in (("manifest", cmd_manifest), ("notes", cmd_notes), ("status", cmd_status)):
        s = sub.add_parser(name, help=f"print a release's {name}")
        s.add_argument("release")
        s.add_argument("namespace")
        s.set_defaults(func=func)

    s = sub.add_parser("list", help="list releases in a namespace")
    s.add_argument("namespace")
    s.set_defaults(func=cmd_list)
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
