"""Replaying a block's frozen submodules: outputs a later pass over the same inputs would
compute again, unchanged, are kept from the pass that computed them.

A true-sequential method runs the block several times while it quantizes (GPTQ: once per step,
then the walker once more for the next block's inputs). Once q/k/v/o are final, every later pass
recomputes the same attention output; once gate/up are final, the same gate and up outputs.

A submodule's output is kept when, as it runs, every quantized Linear inside it is done (its
weight final) and no Linear still to be quantized ran before it in that batch: its inputs and
weights are then what every later pass will give it. A kept output is replayed instead of
running the submodule, unless it was modified in place since (its tensors' version counters
say so). The rest of the block's parameters (norms, biases, Linears left in floating point)
must not change once a Linear is done; they are compared at each pass, and any change drops
everything kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for o in out for t in _tensors(o)]
    return []


class FrozenOutputs:
    """Kept outputs of one block's submodules, by (batch, submodule, call within the batch).

    `quantized`: names (inside the block) of the Linears the method will quantize. `done(name)`
    marks one final. Passes run inside `run(record)`, each batch after `begin_batch(i)`;
    `record=False` for a pass no other follows (nothing is kept from it).
    """

    def __init__(self, block: nn.Module, quantized: Collection[str]):
        self._block = block
        self._modules = {n: m for n, m in block.named_modules() if n}
        # Each submodule that holds quantized Linears, with the ones it holds.
        self._holds = {
            name: {q for q in quantized if q == name or q.startswith(name + ".")}
            for name in self._modules
        }
        self._holds = {n: held for n, held in self._holds.items() if held}
        self._pending = set(quantized)
        self._kept: dict[tuple[int, str, int], tuple[object, list[int]]] = {}
        self._others: dict[str, torch.Tensor] | None = None  # set at the first done()
        self._batch = 0
        self._calls: Counter[str] = Counter()
        self._dirty = False  # a pending Linear ran earlier in this batch
        self._record = False
        self.replayed = 0  # for tests and reports: submodule calls answered from the store

    def done(self, name: str) -> None:
        if self._others is None:
            skip = {f"{q}.weight" for q in self._pending}
            self._others = {
                k: p.detach().clone() for k, p in self._block.named_parameters() if k not in skip
            }
        self._pending.discard(name)

    def clear(self) -> None:
        self._kept.clear()

    def _others_unchanged(self) -> bool:
        params = dict(self._block.named_parameters())
        return all(torch.equal(params[k], v) for k, v in (self._others or {}).items())

    @contextmanager
    def run(self, record: bool = True) -> Iterator[None]:
        if self._others is None:  # nothing is final yet: nothing to keep or replay
            yield
            return
        if not self._others_unchanged():
            self._kept.clear()
            yield
            return
        self._record = record
        # A forward set on the instance (accelerate's hooks do that) is wrapped and put back.
        own = {n: self._modules[n].__dict__.get("forward") for n in self._holds}
        for name in self._holds:
            mod = self._modules[name]
            mod.forward = self._wrap(name, mod.forward)
        try:
            yield
        finally:
            for name, previous in own.items():
                if previous is None:
                    del self._modules[name].forward  # the class's forward again
                else:
                    self._modules[name].forward = previous

    def begin_batch(self, index: int) -> None:
        self._batch = index
        self._calls.clear()
        self._dirty = False

    def _wrap(self, name: str, forward):
        def call(*args, **kwargs):
            key = (self._batch, name, self._calls[name])
            self._calls[name] += 1
            if self._holds[name] & self._pending:
                if name in self._pending:
                    self._dirty = True  # everything after it may see new inputs
                return forward(*args, **kwargs)
            if self._dirty:
                return forward(*args, **kwargs)
            hit = self._kept.get(key)
            if hit is not None:
                out, versions = hit
                if [t._version for t in _tensors(out)] == versions:
                    self.replayed += 1
                    return out
            out = forward(*args, **kwargs)
            if self._record:
                # What it holds is never called again once it is replayed.
                inner = name + "."
                for k in [k for k in self._kept if k[0] == self._batch and k[1].startswith(inner)]:
                    del self._kept[k]
                self._kept[key] = (out, [t._version for t in _tensors(out)])
            return out

        return call
