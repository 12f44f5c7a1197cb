#!/usr/bin/env bash
# Reports pairs of Rust source files that import each other: file A refers to an item of file
# B's module (`use crate::…`, `use super::…`, `use self::…`, a `crate::x::y` path in code, or a
# path through a child module) and B refers to A's module. Such pairs make a module hard to
# split or read on its own; the crate keeps its files a DAG.
#
# Usage: scripts/check-module-cycles.sh [PATH…]   (default: src)
#
# The whole crate under src/ is read (its module tree follows the `mod` declarations from
# src/lib.rs, src/main.rs and src/bin/*.rs, with `name.rs` or `name/mod.rs` per module, and
# inline `mod name { … }` blocks), so that `super::` and `crate::` resolve correctly; only
# pairs whose two files both lie under one of the PATHs are reported. A path resolves to the
# file of its longest prefix that names a module, so `use super::Item` in `a/b.rs` depends on
# `a/mod.rs` (or `a.rs`), and a re-export `pub use b::Item` in `a/mod.rs` depends on
# `a/b.rs`. Comments (doc links included) and string literals are ignored; `mod x;` itself is
# a declaration, not a dependency. Names brought into scope by a `use` are not followed
# further: the `use` line is the dependency.
#
# Cycles through three or more files under the PATHs are reported as well. Exits 1 when a
# pair or a longer cycle is found, 0 otherwise (2 on a usage error). Needs python3.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! command -v python3 >/dev/null; then
    echo "check-module-cycles: python3 is needed" >&2
    exit 2
fi
[ $# -gt 0 ] || set -- src

exec python3 - "$root" "$@" <<'PY'
import os
import re
import sys

root = sys.argv[1]
wanted = [os.path.normpath(os.path.join(os.getcwd(), p)) for p in sys.argv[2:]]
for p in wanted:
    if not os.path.exists(p):
        sys.exit(f"check-module-cycles: no such path: {p}")
src = os.path.join(root, "src")


def tokens(text):
    """(kind, value, line) tokens of Rust source without comments, strings and chars."""
    out, i, n, line = [], 0, len(text), 1
    ident = re.compile(r"r#[A-Za-z_][A-Za-z0-9_]*|[A-Za-z_][A-Za-z0-9_]*")
    raw = re.compile(r'b?r(#*)"')
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += text[i] == "\n"
                    i += 1
        elif (m := raw.match(text, i)) and (i == 0 or not text[i - 1].isalnum()):
            end = '"' + m.group(1)
            j = text.find(end, m.end())
            j = n if j < 0 else j + len(end)
            line += text.count("\n", i, j)
            i = j
        elif c == '"' or (c == "b" and text.startswith('b"', i)):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            line += text.count("\n", i, j)
            i = j + 1
        elif c == "'":
            # A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if text.startswith("'\\", i):
                j = text.find("'", i + 2)
                i = n if j < 0 else j + 1
            elif i + 2 < n and text[i + 2] == "'":
                i += 3
            else:
                i += 1
        elif m := ident.match(text, i):
            out.append(("id", m.group(0).removeprefix("r#"), line))
            i = m.end()
        elif text.startswith("::", i):
            out.append(("::", "::", line))
            i += 2
        else:
            out.append(("p", c, line))
            i += 1
    return out


files = {}  # path -> tokens


def toks(path):
    if path not in files:
        with open(path, encoding="utf-8") as f:
            files[path] = tokens(f.read())
    return files[path]


modules = {}  # (crate, module path tuple) -> file
children = {}  # (crate, module path tuple) -> set of child names


def child_dir(path):
    """The directory that holds the files of `path`'s child modules."""
    base = os.path.basename(path)
    if base in ("mod.rs", "lib.rs", "main.rs") or os.path.dirname(path) == os.path.join(src, "bin"):
        return os.path.dirname(path)
    return os.path.splitext(path)[0]


def inline_modules(t):
    """The inline modules enclosing each token of `t` (a tuple of names per token), and the
    `mod` declarations of `t`: (inline modules around it, name, `{` or `;`)."""
    ctx, decls = [], []
    stack, depth = [], 0  # inline modules: (name, depth at their opening brace)
    for k, (kind, val, _) in enumerate(t):
        ctx.append(tuple(name for name, _ in stack))
        if kind == "p" and val == "{":
            depth += 1
        elif kind == "p" and val == "}":
            depth -= 1
            if stack and stack[-1][1] == depth:
                stack.pop()
        elif kind == "id" and val == "mod" and k + 2 < len(t) and t[k + 1][0] == "id":
            decls.append((ctx[-1], t[k + 1][1], t[k + 2][1]))
            if t[k + 2][1] == "{":
                stack.append((t[k + 1][1], depth))
    return ctx, decls


def walk(crate, path, modpath):
    """Registers the modules of file `path` (module `modpath`) and of the files it declares."""
    modules[(crate, modpath)] = path
    children.setdefault((crate, modpath), set())
    for inner, name, after in inline_modules(toks(path))[1]:
        parent = modpath + inner
        children.setdefault((crate, parent), set()).add(name)
        if after == "{":
            modules[(crate, parent + (name,))] = path
            children.setdefault((crate, parent + (name,)), set())
        elif after == ";":
            d = os.path.join(child_dir(path), *inner)
            for cand in (os.path.join(d, name + ".rs"), os.path.join(d, name, "mod.rs")):
                if os.path.exists(cand):
                    walk(crate, cand, parent + (name,))
                    break


pkg = "crate"
try:
    with open(os.path.join(root, "Cargo.toml"), encoding="utf-8") as f:
        m = re.search(r'(?ms)^\[package\].*?^name\s*=\s*"([^"]+)"', f.read())
        if m:
            pkg = m.group(1).replace("-", "_")
except OSError:
    pass

roots = []
if os.path.exists(os.path.join(src, "lib.rs")):
    roots.append(("lib", os.path.join(src, "lib.rs")))
if os.path.exists(os.path.join(src, "main.rs")):
    roots.append(("main", os.path.join(src, "main.rs")))
bindir = os.path.join(src, "bin")
if os.path.isdir(bindir):
    for b in sorted(os.listdir(bindir)):
        p = os.path.join(bindir, b)
        if b.endswith(".rs"):
            roots.append(("bin:" + b, p))
        elif os.path.exists(os.path.join(p, "main.rs")):
            roots.append(("bin:" + b, os.path.join(p, "main.rs")))
for crate, path in roots:
    walk(crate, path, ())
file_crate = {}
for (crate, modpath), path in modules.items():
    if path not in file_crate or len(modpath) < len(file_crate[path][1]):
        file_crate[path] = (crate, modpath)


def use_paths(t, k):
    """Paths (segment lists, with their line) of the `use` tree starting at token k."""
    out = []

    def tree(k, prefix):
        segs = list(prefix)
        while k < len(t):
            kind, val, line = t[k]
            if kind == "id" and val == "as":
                k += 2
            elif kind == "id":
                segs.append(val)
                k += 1
            elif kind == "::":
                k += 1
            elif val == "*":
                out.append((segs + ["*"], line))
                return k + 1
            elif val == "{":
                k += 1
                while k < len(t) and t[k][1] != "}":
                    k = tree(k, segs)
                    if k < len(t) and t[k][1] == ",":
                        k += 1
                return k + 1
            else:
                break
        if segs != list(prefix):
            out.append((segs, t[k - 1][2] if k else 0))
        return k

    tree(k, [])
    return out


def resolve(crate, cur, segs):
    """The file of the module that the path `segs`, written in module `cur`, refers to."""
    segs = [s for s in segs if s != "*"]
    if not segs:
        return None
    first = segs[0]
    if first == "crate":
        base, rest = (), segs[1:]
    elif first in ("super", "self"):
        base, rest = cur, segs
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                base = base[:-1]
            rest = rest[1:]
    elif first == pkg and crate != "lib" and ("lib", ()) in modules:
        crate, base, rest = "lib", (), segs[1:]
    elif first in children.get((crate, cur), ()):
        base, rest = cur, segs
    else:
        return None
    full = tuple(base) + tuple(s for s in rest if s != "self")
    for n in range(len(full), -1, -1):
        if (crate, full[:n]) in modules:
            return modules[(crate, full[:n])]
    return None


edges = {}  # file -> {file: (line, path text)}
for path, (crate, modpath) in file_crate.items():
    t = toks(path)
    ctx = inline_modules(t)[0]
    found = edges.setdefault(path, {})
    k = 0
    while k < len(t):
        kind, val, line = t[k]
        paths, after = [], k + 1
        if kind == "id" and val == "mod" and k + 2 < len(t) and t[k + 1][0] == "id":
            after = k + 3  # A declaration, not a path.
        elif kind == "id" and val == "use" and (k == 0 or t[k - 1][1] != "::"):
            paths = use_paths(t, k + 1)
            while after < len(t) and t[after][1] != ";":
                after += 1
        elif kind == "id" and k + 1 < len(t) and t[k + 1][0] == "::" and (
            k == 0 or t[k - 1][0] != "::"
        ):
            segs = [val]
            while after + 1 < len(t) and t[after][0] == "::" and t[after + 1][0] == "id":
                segs.append(t[after + 1][1])
                after += 2
            paths = [(segs, line)]
        for segs, l in paths:
            target = resolve(crate, modpath + ctx[k], segs)
            if target and target != path and target not in found:
                found[target] = (l, "::".join(segs))
        k = after


def rel(p):
    return os.path.relpath(p, root)


def inside(p):
    return any(p == w or p.startswith(w + os.sep) for w in wanted)


pairs = []
for a in sorted(edges):
    for b in sorted(edges[a]):
        if a < b and a in edges.get(b, {}) and inside(a) and inside(b):
            pairs.append((a, b))
for a, b in pairs:
    la, pa = edges[a][b]
    lb, pb = edges[b][a]
    print(f"cycle: {rel(a)} <-> {rel(b)}")
    print(f"    {rel(a)}:{la}: {pa}")
    print(f"    {rel(b)}:{lb}: {pb}")
# Cycles through three or more files (strongly connected components, Tarjan's algorithm),
# among the files under the PATHs: the pairs above are the common case, these the rest.
inner = {a: [b for b in sorted(edges[a]) if inside(b)] for a in sorted(edges) if inside(a)}
index, low, on, st, sccs = {}, {}, set(), [], []


def connect(v):
    index[v] = low[v] = len(index)
    st.append(v)
    on.add(v)
    for w in inner.get(v, ()):
        if w not in index:
            connect(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = st.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        sccs.append(sorted(comp))


sys.setrecursionlimit(10000)
for v in inner:
    if v not in index:
        connect(v)
longer = [c for c in sccs if len(c) > 2]
for comp in sorted(longer):
    print("cycle through " + ", ".join(rel(p) for p in comp))
    for a in comp:
        for b in inner[a]:
            if b in comp:
                line, what = edges[a][b]
                print(f"    {rel(a)}:{line}: {what} -> {rel(b)}")
checked = sorted(rel(p) for p in edges if inside(p))
print(f"{len(checked)} files checked under {', '.join(rel(w) for w in wanted)}; "
      f"{len(pairs)} pair(s) of files import each other, "
      f"{len(longer)} longer cycle(s)")
sys.exit(1 if pairs or longer else 0)
PY
