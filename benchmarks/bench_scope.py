"""Step-time overhead of metadata in scope (MetadataModel) against explicit metadata passing.

Usage::

    python benchmarks/bench_scope.py [--threads 2] [--rounds 5] [--batch 64] [--size 64]
                                     [--no-compile] [--call-only] [--json PATH]

Two copies of one ResNet-18-like network (BasicBlocks 64-128-256-512, stem conv 7×7/2 and
max-pool, written here: torchvision does not import on this machine), with MDN replacing the
last block's second BatchNorm (``layer4.1.bn2``, a 512×2×2 map at 64×64 input) and MDN on the
pooled features before the classifier, as the paper puts it. The same weights in both:

  explicit   the network written with ``forward(x, metadata)``, calling ``mdn(h, metadata)``
  scope      the plain network (``forward(x)``) converted by
             ``metanorm.nn.convert_metadata_norm`` and called as ``model(x, metadata=rows)``

and each of them under ``torch.compile`` (inductor, ``fullgraph=True``: the scope variant is
one graph, as the explicit one). A step is forward, cross-entropy, backward and an SGD step on a
(batch, 3, size, size) float32 batch with a site design (K = 4: label kept, two site columns,
intercept). The variants run in turn, round after round (the order rotates), after one warm-up
step each (which also compiles); reported are the median step time per variant and the median
over rounds of the per-round ratio scope / explicit.

A second, small measurement isolates the mechanism's own cost: one call of a Linear(16, 16) +
MDN model, scope against explicit, in microseconds (no backward), 500 calls per timing, the
best timing of each over the rounds and the median per-round ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from metanorm.nn import MetadataModel, MetadataNorm, convert_metadata_norm


class BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm and a residual (a 1×1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class ResNet18(nn.Module):
    """The ResNet-18 layout (2 BasicBlocks per stage); ``forward(x)`` takes no metadata."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (cin, cout, stride) in enumerate(widths, 1):
            setattr(
                self,
                f"layer{i}",
                nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)),
            )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Explicit(nn.Module):
    """The same network with ``forward(x, metadata)`` and explicit ``mdn(h, metadata)`` calls."""

    def __init__(self, net: ResNet18, design: Tensor, map_features: int) -> None:
        super().__init__()
        self.net = net
        self.mdn_bn2 = MetadataNorm(map_features, design, keep=[0])
        self.mdn_pool = MetadataNorm(512, design, keep=[0])

    def forward(self, x: Tensor, metadata: Tensor) -> Tensor:
        n = self.net
        x = n.layer3(n.layer2(n.layer1(n.stem(x))))
        x = n.layer4[0](x)
        b = n.layer4[1]
        out = b.relu(b.bn1(b.conv1(x)))
        x = b.relu(self.mdn_bn2(b.conv2(out), metadata) + b.downsample(x))
        x = self.mdn_pool(n.avgpool(x), metadata)
        return n.fc(torch.flatten(x, 1))


def make_design(n: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen).float()
    site = torch.randint(0, 3, (n,), generator=gen)
    return torch.stack([y, (site == 1).float(), (site == 2).float(), torch.ones(n)], dim=1)


def build(batch: int, size: int) -> tuple[dict[str, nn.Module], Tensor, Tensor, Tensor]:
    design = make_design(10 * batch)
    torch.manual_seed(0)
    net = ResNet18()
    hand_net = copy.deepcopy(net)
    side = size // 32  # the stride of layer4
    explicit = Explicit(hand_net, design, 512 * side * side)
    explicit.net.layer4[1].bn2 = nn.Identity()  # replaced by mdn_bn2 in forward
    scope = convert_metadata_norm(
        net, design, replace=["layer4.1.bn2"], after=["avgpool"], keep=[0]
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = design[:batch, 0].long()
    scope(x, metadata=design[:batch])  # sizes the lazy layers
    return {"explicit": explicit, "scope": scope}, x, y, design[:batch]


def make_step(model: nn.Module, scoped: bool, x: Tensor, y: Tensor, rows: Tensor) -> Callable:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def call(inp: Tensor) -> Tensor:
        return model(inp, metadata=rows) if scoped else model(inp, rows)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(call(x), y).backward()
        opt.step()

    return step


def _timed(fn: Callable[[], None], repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_network(rounds: int, batch: int, size: int, compile: bool) -> dict[str, object]:
    models, x, y, rows = build(batch, size)
    steps: dict[str, Callable[[], None]] = {}
    for name, model in models.items():
        steps[name] = make_step(model, name == "scope", x, y, rows)
    compile_s: dict[str, float] = {}
    if compile:
        for name, model in list(models.items()):
            compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
            steps[f"{name}, compiled"] = make_step(compiled, name == "scope", x, y, rows)
    for name, step in steps.items():  # warm-up (and compilation)
        compile_s[name] = _timed(step)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(steps[name]))
    result: dict[str, object] = {
        "median_s": {n: statistics.median(t) for n, t in times.items()},
        "first_step_s": compile_s,
    }
    ratios = {"eager": [s / e for s, e in zip(times["scope"], times["explicit"], strict=True)]}
    if compile:
        ratios["compiled"] = [
            s / e
            for s, e in zip(times["scope, compiled"], times["explicit, compiled"], strict=True)
        ]
    result["ratio_scope_over_explicit"] = {k: statistics.median(v) for k, v in ratios.items()}
    result["ratios_per_round"] = ratios
    return result


class _Small(nn.Module):
    def __init__(self, design: Tensor) -> None:
        super().__init__()
        self.fc, self.mdn = nn.Linear(16, 16), MetadataNorm(16, design, keep=[0])

    def forward(self, x: Tensor, metadata: Tensor | None = None) -> Tensor:
        return self.mdn(self.fc(x), metadata)


def bench_call(rounds: int, calls: int = 500) -> dict[str, float]:
    design = make_design(320)
    torch.manual_seed(0)
    small = _Small(design)
    wrapped = MetadataModel(small)
    x, rows = torch.randn(32, 16), design[:32]
    variants = {
        "explicit": lambda: small(x, rows),
        "scope": lambda: wrapped(x, metadata=rows),
    }
    times: dict[str, list[float]] = {n: [] for n in variants}
    with torch.no_grad():
        for fn in variants.values():
            _timed(fn, 100)
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                times[name].append(_timed(variants[name], calls) * 1e6)
    best = {n: min(t) for n, t in times.items()}  # the least disturbed timing of each
    ratio = statistics.median(s / e for s, e in zip(times["scope"], times["explicit"], strict=True))
    return {
        "explicit_us": best["explicit"],
        "scope_us": best["scope"],
        "overhead_us": best["scope"] - best["explicit"],
        "median_ratio": ratio,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--call-only", action="store_true", help="only the per-call timing")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    call = bench_call(max(4 * args.rounds, 20))
    print(
        f"one call, Linear(16,16)+MDN, batch 32, best of rounds: explicit "
        f"{call['explicit_us']:.1f} us, scope {call['scope_us']:.1f} us "
        f"({call['overhead_us']:+.1f} us); median ratio {call['median_ratio']:.3f}"
    )
    if args.call_only:
        return 0
    net = bench_network(args.rounds, args.batch, args.size, not args.no_compile)
    print(f"ResNet-18-like, batch {args.batch}, 3x{args.size}x{args.size}, {args.rounds} rounds")
    for name, t in net["median_s"].items():  # type: ignore[union-attr]
        first = net["first_step_s"][name]  # type: ignore[index]
        print(f"  {name:20s} median step {t:.3f} s   (first step {first:.1f} s)")
    for kind, ratio in net["ratio_scope_over_explicit"].items():  # type: ignore[union-attr]
        print(f"  scope / explicit, {kind}: {ratio:.3f}")
    if args.json:
        info = {"platform": platform.platform(), "torch": torch.__version__, "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"info": info, "call": call, "network": net}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
