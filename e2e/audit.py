#!/usr/bin/env python3
"""Exactly-once audit of blocksmith blocks, with pyarrow (a reader independent of the writer).

Reads every block under --blocks through its manifest (which names the data object), checks
the data against it (sha256, record count, range), counts data objects no manifest names
(uncommitted attempts, not part of the output), and compares the records with what the data generator produced (--expected
CSV). Prints a JSON report; exits 1 unless every expected offset below the committed offset
appears exactly once with equal content, and nothing else appears.
"""
import argparse
import collections
import hashlib
import json
import os
import re
import sys

import pyarrow.parquet as pq


MANIFEST = re.compile(r"\d{20}-\d{20}\.json")


def digest(b):
    return hashlib.sha256(b).hexdigest()[:16]


def header_key(h):
    # key_bytes holds the exact key when it is not UTF-8 (key then has U+FFFD in its place).
    exact = h.get("key_bytes")
    return exact if exact is not None else h["key"].encode()


def headers_digest(headers):
    items = [[header_key(h).hex(), None if h["value"] is None else h["value"].hex()] for h in headers]
    return digest(json.dumps(items, separators=(",", ":")).encode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", required=True, help="directory holding the blocks")
    ap.add_argument("--expected", required=True, help="CSV written by blocksmith-datagen")
    ap.add_argument("--committed", help='JSON {"partition": committedOffset}; default: every expected offset')
    args = ap.parse_args()

    expected = {}
    with open(args.expected) as f:
        next(f)
        for line in f:
            p, o, ts, key, value, vlen, headers = line.rstrip("\n").split(",")
            expected[(int(p), int(o))] = (int(ts), None if key == "-" else key, None if value == "-" else value, int(vlen), headers)
    committed = None
    if args.committed:
        committed = {int(k): v for k, v in json.loads(args.committed).items()}

    seen = collections.Counter()
    problems = []
    blocks = records = 0
    named = set()
    data_files = []
    for root, _, files in os.walk(args.blocks):
        for name in sorted(files):
            if name.endswith(".parquet"):
                data_files.append(os.path.join(root, name))
            if not MANIFEST.fullmatch(name):
                continue
            # A block is its manifest: it names the data object it vouches for.
            stem = name[: -len(".json")]
            start, end = (int(x) for x in stem.split("-"))
            manifest = json.load(open(os.path.join(root, name)))
            path = os.path.join(root, manifest.get("data", stem + ".parquet"))
            named.add(path)
            blocks += 1
            if not os.path.exists(path):
                problems.append(f"{name}: names {path}, which does not exist")
                continue
            data = open(path, "rb").read()
            if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
                problems.append(f"{path}: sha256 differs from its manifest")
            table = pq.read_table(path)
            if table.num_rows != manifest["records"]:
                problems.append(f"{path}: {table.num_rows} rows, manifest says {manifest['records']}")
            if (manifest["startOffset"], manifest["endOffset"]) != (start, end):
                problems.append(f"{path}: manifest range differs from the key")
            cols = table.to_pydict()
            for i in range(table.num_rows):
                p, o = cols["partition"][i], cols["offset"][i]
                records += 1
                seen[(p, o)] += 1
                if not start <= o < end:
                    problems.append(f"{path}: offset {o} outside [{start}, {end})")
                exp = expected.get((p, o))
                if exp is None:
                    problems.append(f"{path}: unexpected record {p}/{o}")
                    continue
                ts = cols["timestamp"][i]
                ts_ms = None if ts is None else int(ts.timestamp() * 1000 + 0.5) if hasattr(ts, "timestamp") else ts
                key = cols["key"][i]
                value = cols["value"][i]
                got = (
                    ts_ms,
                    None if key is None else digest(key),
                    None if value is None else digest(value),
                    0 if value is None else len(value),
                    headers_digest(cols["headers"][i]),
                )
                if got != exp:
                    problems.append(f"{path}: record {p}/{o} content differs: {got} != {exp}")

    # Data no manifest names: an attempt that never committed, not part of the output.
    uncommitted = [p for p in data_files if p not in named]
    duplicated = sum(1 for c in seen.values() if c > 1)
    wanted = [k for k in expected if committed is None or k[1] < committed.get(k[0], 0)]
    missing = [k for k in wanted if seen[k] == 0]
    report = {
        "blocks": blocks,
        "records": records,
        "expected": len(wanted),
        "missing": len(missing),
        "duplicated": duplicated,
        "problems": len(problems),
        "uncommitted": len(uncommitted),
        "examples": (problems + [f"missing {p}/{o}" for p, o in missing])[:10],
    }
    print(json.dumps(report))
    sys.exit(0 if not problems and not missing and not duplicated else 1)


if __name__ == "__main__":
    main()
