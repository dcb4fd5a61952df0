"""Where a train step's time goes, read from a profiler trace of the running step, for our compiled XLA step
and for the PyTorch reference step alike.

Each op's own time (its span less the spans of the ops it contains, such as a while loop's body) is put in one
cell of a part x kind grid:
- part, the piece of the TDD step that issued the op: the student's forward, its backward, the teacher's CFG
  forward, the target forward, and the rest (noise draws, loss, gradient clipping, the optimizer). Ours reads
  it from the named scopes in ``TrainStep._microbatch`` that XLA keeps in each op's ``op_name``; the PyTorch
  step marks the same pieces with ``torch.profiler.record_function``.
- kind: convolution, matmul (attention included), reduction/normalisation, elementwise, data movement (copies,
  transposes, concatenation, slicing, padding), and other (control flow, random bits, host glue).
On XLA:CPU the events are the thunks of the compiled program (one per HLO instruction; fusions count as
their kind of work: a fusion around a convolution is a convolution); on torch they are the aten ops.
"""

from __future__ import annotations

import glob
import re
import tempfile
from bisect import bisect_left
from collections import defaultdict
from typing import NamedTuple

PARTS = ("student forward", "student backward", "teacher", "target", "rest")
KINDS = ("conv", "matmul", "reduce/norm", "elementwise", "data movement", "other")
TOP = 12  # the single ops listed with the most time
SCOPES = {"student": "student", "teacher": "teacher", "target": "target"}  # TrainStep._microbatch's scopes

_DATA_MOVEMENT = {"copy", "transpose", "bitcast", "broadcast", "slice", "concatenate", "pad", "reshape",
                  "dynamic-slice", "dynamic-update-slice", "gather", "scatter", "reverse", "copy-start",
                  "copy-done", "iota"}
_STRUCTURAL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
_INHERIT = ("student backward", "student forward", "target", "teacher")  # an unnamed op's part, by precedence
_CONTROL = {"while", "conditional", "call", "rng-bit-generator", "rng", "sort", "after-all", "custom-call"}


# --- XLA ------------------------------------------------------------------------------------------------------

def xla_part(op_name: str) -> str:
    """The part of the step an HLO op belongs to, from its ``op_name`` metadata (jax's scope path)."""
    for scope, part in SCOPES.items():
        if f"transpose(jvp({scope}" in op_name:
            return "student backward" if part == "student" else part
        if f"jvp({scope}" in op_name or f"/{scope}/" in op_name or op_name.endswith(f"/{scope}"):
            return "student forward" if part == "student" else part
    return "rest"


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|\s)([a-z][a-z0-9\-]*)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")


class HloOp(NamedTuple):
    kind: str
    part: str
    opcode: str
    operands: tuple[str, ...]


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
    """{instruction name: HloOp} for every instruction of an optimized HLO module's text."""
    comps, instrs, operands, current = defaultdict(set), {}, {}, None
    for line in hlo_text.splitlines():
        if (m := _COMP.match(line)) and " = " not in line.split("{")[0]:
            current = m.group(1)
            continue
        if not (m := _INSTR.match(line)) or current is None:
            continue
        name, rest = m.groups()
        body = rest.split(", metadata=")[0]
        op = _OPCODE.search(body)
        opcode = op.group(1) if op else "unknown"
        comps[current].add(opcode)
        calls = re.findall(r"calls=%([\w.\-]+)", body) + re.findall(r"to_apply=%([\w.\-]+)", body)
        target = re.search(r'custom_call_target="([^"]+)"', body)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        instrs[name] = (opcode, calls, target.group(1) if target else "", op_name.group(1) if op_name else "")
        operands[name] = [o for o in re.findall(r"%([\w.\-]+)", body) if o not in calls]

    def kind(opcode: str, calls: list[str], target: str) -> str:
        if opcode == "fusion":
            ops = set().union(*(comps.get(c, set()) for c in calls)) - _STRUCTURAL
            if "convolution" in ops:
                return "conv"
            if "dot" in ops:
                return "matmul"
            if ops & {"reduce", "reduce-window"}:
                return "reduce/norm"
            return "data movement" if ops <= _DATA_MOVEMENT else "elementwise"
        if opcode == "convolution":
            return "conv"
        if opcode == "dot":
            return "matmul"
        if opcode == "custom-call" and ("matmul" in target or "dot" in target):
            return "matmul"
        if opcode == "custom-call" and "conv" in target:
            return "conv"
        if opcode in ("reduce", "reduce-window", "select-and-scatter"):
            return "reduce/norm"
        if opcode in _DATA_MOVEMENT:
            return "data movement"
        if opcode in _CONTROL or opcode in _STRUCTURAL or opcode == "unknown":
            return "other"
        return "elementwise"

    parts: dict[str, str] = {}

    def part(name: str) -> str:
        """From the op's own op_name; XLA leaves some ops without one (the weight-gradient convolutions it
        rewrites, copies it inserts), and those take the part of what they consume, a gradient's first."""
        if name not in parts:
            parts[name] = "rest"  # while resolving: operands never lead back here (HLO is a DAG)
            _, _, _, op_name = instrs[name]
            if op_name:
                parts[name] = xla_part(op_name)
            else:
                found = {part(o) for o in operands[name] if o in instrs}
                parts[name] = next((p for p in _INHERIT if p in found), "rest")
        return parts[name]

    return {n: HloOp(kind(op, calls, target), part(n), op, tuple(operands[n]))
            for n, (op, calls, target, _) in instrs.items()}


def innermost_segments(spans: list[tuple[int, int, object]]) -> list[tuple[int, int, object]]:
    """One thread's (start, end, key) spans cut into pieces each owned by the innermost span running then (a
    while loop owns only the time between its body's ops)."""
    out, stack, cursor = [], [], None  # stack of (end, key)

    def close_until(t):
        nonlocal cursor
        while stack and stack[-1][0] <= t:
            end, key = stack.pop()
            if end > cursor:
                out.append((cursor, end, key))
            cursor = max(cursor, end)

    for start, end, key in sorted(spans, key=lambda s: (s[0], -s[1])):
        if cursor is not None:
            close_until(start)
            if stack and start > cursor:
                out.append((cursor, start, stack[-1][1]))
        cursor = start if cursor is None else max(cursor, start)
        stack.append((end, key))
    if stack:
        close_until(max(e for e, _ in stack))
    return out


def shared_wall_time(segments: list[tuple[int, int, object]]) -> dict:
    """{key: ns} from pieces of all threads: while k pieces run at once, each is given 1/k of the time, so the
    shares add up to the time anything ran. (XLA:CPU runs independent thunks side by side, each then slower.)"""
    edges = sorted({t for a, b, _ in segments for t in (a, b)})
    index = {t: i for i, t in enumerate(edges)}
    delta = [[] for _ in edges]  # per edge: (+1 or -1, key)
    for a, b, key in segments:
        delta[index[a]].append((1, key))
        delta[index[b]].append((-1, key))
    shares, active = defaultdict(float), defaultdict(int)
    for i, t in enumerate(edges):
        for sign, key in delta[i]:
            active[key] += sign
            if not active[key]:
                del active[key]
        if active and i + 1 < len(edges):
            n = sum(active.values())
            for key, count in active.items():
                shares[key] += (edges[i + 1] - t) * count / n
    return dict(shares)


def empty_grid() -> dict[str, dict[str, float]]:
    return {part: {kind: 0.0 for kind in KINDS} for part in PARTS}


def until_consumed(lines: list[list[tuple]], ops: dict[str, HloOp]) -> tuple[list[list[tuple]], list[tuple]]:
    """(the threads' spans without the asynchronous ones, the asynchronous spans each stretched to its end).

    XLA:CPU runs a plain ``convolution`` thunk (Eigen's) asynchronously: its span ends at dispatch, and the
    work goes on in Eigen's pool while the thread runs other thunks. Such a span is taken to end where the
    first thunk that consumes its result starts (looking through bitcasts and tuples), and is kept apart from
    its thread's nesting.
    """
    consumers = defaultdict(set)
    for name, op in ops.items():
        for operand in op.operands:
            consumers[operand].add(name)
    starts = defaultdict(list)
    for spans in lines:
        for start, _, name in spans:
            starts[name].append(start)
    for v in starts.values():
        v.sort()
    def thunk_consumers(name, depth=0):  # through the ops that run no thunk (bitcasts, tuples)
        out = set()
        for c in consumers[name]:
            if c in starts:
                out.add(c)
            elif depth < 8 and ops[c].opcode in _STRUCTURAL:
                out |= thunk_consumers(c, depth + 1)
        return out

    kept, stretched = [], []
    for spans in lines:
        kept.append([])
        for start, end, name in spans:
            if ops[name].opcode != "convolution":
                kept[-1].append((start, end, name))
                continue
            after = [starts[c][i] for c in thunk_consumers(name) if (i := bisect_left(starts[c], end)) < len(starts[c])]
            stretched.append((start, max(end, min(after, default=end)), name))
    return kept, stretched


def xla_step_profile(run, compiled, repeats: int) -> dict:
    """{'grid': part -> kind -> seconds per step, 'op_s': their sum (the time any op ran), 'thread_s': the
    ops' time summed over threads, 'events': thunks per step, 'top': the ``TOP`` ops with the most time}
    from a ``jax.profiler`` trace of ``repeats`` calls of ``run`` (which runs the ``compiled`` program once).
    Time that ops share is split among them."""
    import jax
    from jax.profiler import ProfileData

    text = compiled.as_text()
    module = re.search(r"^HloModule\s+([^\s,]+)", text, re.M).group(1)
    ops = hlo_ops(text)
    grid = empty_grid()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(repeats):
                run()
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(path)
    lines = []
    for plane in data.planes:
        for line in plane.lines:
            spans = []
            for e in line.events:
                stats = dict(e.stats)
                if stats.get("hlo_module") == module and stats.get("hlo_op") in ops:
                    spans.append((e.start_ns, e.end_ns, stats["hlo_op"]))
            lines.append(spans)
    events = sum(map(len, lines))
    if not events:
        raise RuntimeError(f"the profiler trace holds no op of module {module}: is the XLA:CPU thunk runtime "
                           "tracing (xla_cpu_enable_xprof_traceme)?")
    lines, async_spans = until_consumed(lines, ops)
    segments, thread_ns = list(async_spans), sum(b - a for a, b, _ in async_spans)
    for spans in lines:
        pieces = innermost_segments(spans)
        thread_ns += sum(b - a for a, b, _ in pieces)
        segments += pieces
    shares = shared_wall_time(segments)
    for name, ns in shares.items():
        grid[ops[name].part][ops[name].kind] += ns * 1e-9 / repeats
    top = [{"op": name, "kind": ops[name].kind, "part": ops[name].part, "s": ns * 1e-9 / repeats}
           for name, ns in sorted(shares.items(), key=lambda kv: -kv[1])[:TOP]]
    return {"grid": grid, "op_s": sum(sum(row.values()) for row in grid.values()),
            "thread_s": thread_ns * 1e-9 / repeats, "events": events / repeats, "top": top}


# --- torch ----------------------------------------------------------------------------------------------------

_T_CONV = ("conv",)
_T_MATMUL = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "dot", "scaled_dot_product", "attention")
_T_REDUCE = ("norm", "sum", "mean", "var", "std", "softmax", "max", "min", "amax", "logsumexp")
_T_MOVE = ("copy", "cat", "contiguous", "clone", "to", "_to_copy", "permute", "transpose", "view", "reshape",
           "expand", "slice", "select", "index", "chunk", "split", "stack", "empty", "zeros", "zero_", "fill_",
           "narrow", "unsqueeze", "squeeze", "as_strided", "t", "flatten", "repeat", "detach", "_unsafe_view",
           "alias", "pad", "constant_pad_nd", "unbind", "split_with_sizes", "resolve_conj", "resolve_neg",
           "upsample_nearest2d", "lift_fresh", "new_zeros", "new_empty", "empty_like", "zeros_like", "ones_like")


def torch_kind(name: str) -> str:
    """The kind of a torch profiler event (aten op names; anything else is host glue)."""
    if not name.startswith("aten::"):
        return "other"
    op = name[len("aten::"):].removeprefix("_foreach_")
    if any(k in op for k in _T_CONV):
        return "conv"
    if op.rstrip("_") in _T_MATMUL or any(k in op for k in ("scaled_dot_product", "flash_attention")):
        return "matmul"
    if any(k in op for k in _T_REDUCE):
        return "reduce/norm"
    if op in _T_MOVE or op.rstrip("_") in _T_MOVE or op.startswith("upsample"):
        return "data movement"
    return "elementwise"


def torch_step_profile(run, repeats: int) -> dict:
    """The same grid for a torch step whose pieces are marked with ``record_function`` named as ``PARTS``."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    grid, events = empty_grid(), 0
    for e in prof.events():
        if e.name in PARTS:
            kind = "other"  # the marker's own time: Python between the ops
        else:
            kind = torch_kind(e.name)
        part, parent = "rest", e
        while parent is not None:
            if parent.name in PARTS:
                part = parent.name
                break
            parent = parent.cpu_parent
        grid[part][kind] += e.self_cpu_time_total * 1e-6 / repeats
        events += 1
    return {"grid": grid, "op_s": sum(sum(row.values()) for row in grid.values()), "events": events / repeats}


# --- report ---------------------------------------------------------------------------------------------------

def grid_table(profiles: dict[str, dict]) -> str:
    """One markdown table: a row per part (then the total), a column per kind, ms per step for each side."""
    sides = list(profiles)
    head = "| part | " + " | ".join(f"{k} ms ({' / '.join(sides)})" for k in KINDS) + " | all ms | share |"
    rows = [head, "|---" * (len(KINDS) + 3) + "|"]
    totals = {s: profiles[s]["op_s"] for s in sides}
    for part in (*PARTS, "all"):
        cells = []
        for kind in (*KINDS, "all"):
            vals = []
            for s in sides:
                g = profiles[s]["grid"]
                parts = PARTS if part == "all" else (part,)
                kinds = KINDS if kind == "all" else (kind,)
                vals.append(sum(g[p][k] for p in parts for k in kinds))
            cells.append(" / ".join(f"{1e3 * v:.0f}" for v in vals))
        shares = []
        for s in sides:
            g = profiles[s]["grid"]
            part_s = sum(g[p][k] for p in (PARTS if part == "all" else (part,)) for k in KINDS)
            shares.append(f"{100 * part_s / totals[s]:.0f}%" if totals[s] else "")
        rows.append(f"| {part} | " + " | ".join(cells) + " | " + " / ".join(shares) + " |")
    return "\n".join(rows)


def top_table(profile: dict) -> str:
    """The single XLA ops with the most time per step."""
    rows = ["| XLA op | kind | part | ms per step |", "|---|---|---|---|"]
    rows += [f"| {t['op']} | {t['kind']} | {t['part']} | {1e3 * t['s']:.1f} |" for t in profile["top"]]
    return "\n".join(rows)
