"""The order a grid visits its cells in: each step should change as few LoRA-patched elements as possible.

Every cell is exact whatever the order (the patcher merges from pristine), so the order is only
about cost. The cost of going from one cell to the next is the number of weight elements the
patcher rewrites: those of every layer whose (LoRA, per-layer weight) entries differ between the
two stacks. Layers are grouped by what decides their entries (component, LBW block, which LoRAs
touch them), so comparing two cells is a few dozen tuple comparisons, not thousands of layers.

Candidates: the snake (reflected Gray) order of every axis nesting, in which consecutive cells
differ in one axis only, so the dearest axis can be put outermost; and a greedy nearest-neighbour
tour. The cheapest by this cost model wins; row-major ("naive", A1111's order) is kept to compare.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from studio.lora.block_weights import LayerWeights, layer_weights
from studio.lora.stack import StackItem

Cell = tuple[int, ...]  # (x, y, z) indices
Footprint = Callable[[StackItem], Sequence[tuple[str, str, "int | None", int]]]  # (component, module, block, elements)
Signature = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class _Layer:
    component: str
    module: str = ""


def weight_at(item: StackItem, component: str, block: int | None) -> float:
    """The weight `item` gives a layer of `component` in `block`. Step ranges are left out of the
    model: a cell that switches mid-denoise costs its switches whatever the order."""
    w = layer_weights(item.spec, item.blocks, lambda _c, _m: block)
    return w.of(_Layer(component)) if isinstance(w, LayerWeights) else w


class CostModel:
    """Elements rewritten between two stacks, from each LoRA's layers (its footprint)."""

    def __init__(self, stacks: Mapping[Cell, Sequence[StackItem]], footprint: Footprint):
        self.groups: dict[tuple, int] = {}  # (component, block, LoRA paths touching) -> elements
        touched: dict[tuple[str, str], tuple[str | None, list[str], int]] = {}
        seen: set[str] = set()
        for stack in stacks.values():
            for item in stack:
                key = str(item.path)
                if key in seen:
                    continue
                seen.add(key)
                for component, module, block, elements in footprint(item):
                    _, paths, _ = touched.setdefault((component, module), (None, [], elements))
                    paths.append(key)
                    touched[(component, module)] = (block, paths, elements)
        for (component, _module), (block, paths, elements) in touched.items():
            group = (component, block, tuple(sorted(paths)))
            self.groups[group] = self.groups.get(group, 0) + elements
        self._sigs = {cell: self._signatures(stack) for cell, stack in stacks.items()}

    def _signatures(self, stack: Sequence[StackItem]) -> dict[tuple, Signature]:
        out: dict[tuple, Signature] = {}
        for group in self.groups:
            component, block, paths = group
            sig = []
            for item in stack:
                if str(item.path) in paths:
                    w = weight_at(item, component, block)
                    if w != 0.0:
                        sig.append((str(item.path), w))
            out[group] = tuple(sig)
        return out

    def cost(self, a: Cell | None, b: Cell) -> int:
        """Elements the patcher writes going from cell `a` (None: a clean model) to cell `b`.

        A grid started on a model that still holds another stack also takes that one off in its first
        cell: the measured bytes then exceed the plan by that much.
        """
        after = self._sigs[b]
        before = self._sigs[a] if a is not None else {g: () for g in self.groups}
        return sum(n for g, n in self.groups.items() if before[g] != after[g])

    def total(self, order: Sequence[Cell]) -> int:
        return sum(self.cost(a, b) for a, b in zip([None, *order[:-1]], order))


def row_major(shape: Sequence[int]) -> list[Cell]:
    """x fastest, then y, then z: the order A1111's X/Y/Z plot runs."""
    return [tuple(reversed(c)) for c in itertools.product(*(range(n) for n in reversed(shape)))]


def snake(shape: Sequence[int], nesting: Sequence[int]) -> list[Cell]:
    """Reflected mixed-radix Gray order; `nesting` lists axes from outermost to innermost."""
    order: list[Cell] = [()]
    built: list[int] = []
    for axis in nesting:
        out = []
        for i, prefix in enumerate(order):
            values = range(shape[axis]) if i % 2 == 0 else reversed(range(shape[axis]))
            out += [prefix + (v,) for v in values]
        order, built = out, built + [axis]
    position = {axis: k for k, axis in enumerate(built)}
    return [tuple(cell[position[axis]] for axis in range(len(shape))) for cell in order]


def greedy(cells: Sequence[Cell], model: CostModel) -> list[Cell]:
    left, order, here = list(cells), [], None
    while left:
        nxt = min(left, key=lambda c: (model.cost(here, c), cells.index(c)))
        left.remove(nxt)
        order.append(nxt)
        here = nxt
    return order


def best_order(shape: Sequence[int], model: CostModel) -> tuple[list[Cell], str]:
    """(the cheapest order found, how it was made)."""
    naive = row_major(shape)
    candidates = [(naive, "row by row")]
    for nesting in itertools.permutations(range(len(shape))):
        names = "xyz"
        candidates.append((snake(shape, nesting), "snake, " + " > ".join(names[a] for a in nesting)))
    if len(naive) <= 400:  # greedy is quadratic in cells
        candidates.append((greedy(naive, model), "greedy nearest cell"))
    return min(candidates, key=lambda c: model.total(c[0]))
