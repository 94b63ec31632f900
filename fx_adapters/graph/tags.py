"""Node tags: what a method's rewrite added to a graph, as a typed record in ``node.meta["fx_adapters"]``.

Every node an adapter method inserts carries a ``Tag`` naming the layer it adapts; each method subclasses it
with what its own passes need (RoAd's rotations their group size, X-LoRA's experts their pass). The match pass
never treats a tagged node as a layer, fold and export refuse graphs that still hold tagged nodes, and passes
find their own nodes with ``tagged(graph, TheirTag)``.

>>> import dataclasses, torch
>>> @dataclasses.dataclass(frozen=True)
... class Scaled(Tag):
...     factor: float
>>> graph = torch.fx.Graph()
>>> x = graph.placeholder("x")
>>> y = graph.call_function(torch.mul, (x, 2.0))
>>> set_tag(y, Scaled("fc", 2.0))
>>> [(node.name, tag.layer, tag.factor) for node, tag in tagged(graph, Scaled)]
[('mul', 'fc', 2.0)]
>>> tag_of(x) is None
True
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

__all__ = ["TAG_KEY", "Tag", "is_tagged", "set_tag", "tag_of", "tagged"]

TAG_KEY = "fx_adapters"

T = TypeVar("T", bound="Tag")


@dataclass(frozen=True)
class Tag:
    """A node an adapter method added for the layer at module path ``layer``."""

    layer: str


def tag_of(node: torch.fx.Node) -> Tag | None:
    """The node's tag, None for a node of the captured model."""
    return node.meta.get(TAG_KEY)


def set_tag(node: torch.fx.Node, tag: Tag) -> None:
    node.meta[TAG_KEY] = tag


def is_tagged(node: torch.fx.Node, kind: type[Tag] = Tag) -> bool:
    """Whether a method added ``node`` (with a tag of type ``kind``)."""
    return isinstance(tag_of(node), kind)


def tagged(graph: torch.fx.Graph, kind: type[T]) -> Iterator[tuple[torch.fx.Node, T]]:
    """``(node, tag)`` for each node of ``graph`` tagged with a ``kind``, in graph order."""
    for node in graph.nodes:
        tag = tag_of(node)
        if isinstance(tag, kind):
            yield node, tag
