"""The no-residual policy (``convert(..., no_residual="block_entry")``): where to shift a network
that has no residual join (VGG, DenseNet, Inception, LCNet).

A *block* is the innermost module holding two or more mixing layers (DenseNet's dense layer, an
Inception branch, LCNet's depthwise-separable block); in a plain stack of layers (a module with
four or more mixing layers as direct children, such as VGG's ``features``) every layer is its
own block. A block's *first* layers are its mixing layers that no other mixing layer of the
block precedes. From each first layer we walk back through the block's single-input,
non-mixing ops (norm, activation, pooling) to the tensor that enters the block, and shift that
tensor for those readers only. Sibling blocks entered by the same tensor (an Inception module's
parallel branches) share one entry, named after the module they all sit in; a block on another
path (an auxiliary head) gets its own. Tensors no mixing layer has touched yet (the image) and
tensors without spatial or token dimensions (pooled features entering a classifier) are not
shifted.
"""

from dataclasses import dataclass

from torch import fx

from ._index import GraphIndex, Shape, common_prefix, module_path

__all__ = ["BlockEntry", "block_entries"]

_FLAT_SEQUENCE = 4  # a module with this many mixing layers as direct children is a plain layer stack


@dataclass(frozen=True)
class BlockEntry:
    """The tensor entering a block, shifted for the block's first layers only.

    Attributes:
        block: the module path the entry is named after (``"features.denseblock1.denselayer1"``).
        entry: graph node name of the tensor entering the block.
        first_readers: nodes reading ``entry`` on the way to the block's first layers (rewired
            to the shifted tensor).
        other_readers: the other nodes reading ``entry`` (left alone).
        shape, channels, channel_dim: of ``entry``, for the example input.
    """

    block: str
    entry: str
    first_readers: tuple[str, ...]
    other_readers: tuple[str, ...]
    shape: Shape
    channels: int
    channel_dim: int


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _inside(path: str | None, block: str) -> bool:
    return path is not None and (block == "" or path == block or path.startswith(block + "."))


def _blocks(mixing: list[fx.Node]) -> dict[str, list[fx.Node]]:
    """Block path -> its mixing layers, in graph order."""
    owners = {n: module_path(n) or "" for n in mixing}
    under: dict[str, set] = {}
    children: dict[str, int] = {}
    for owner in set(owners.values()):
        parts = owner.split(".") if owner else []
        for k in range(len(parts)):
            under.setdefault(".".join(parts[:k]), set()).add(owner)
        children[_parent(owner)] = children.get(_parent(owner), 0) + 1

    def block_of(owner: str) -> str:
        path = _parent(owner) if owner else ""
        while path and len(under.get(path, ())) < 2:
            path = _parent(path)
        return owner if not path or children.get(path, 0) >= _FLAT_SEQUENCE else path

    blocks: dict[str, list[fx.Node]] = {}
    for node in mixing:
        blocks.setdefault(block_of(owners[node]), []).append(node)
    return blocks


def _entry_of(index: GraphIndex, layer: fx.Node, block: str) -> tuple[fx.Node, fx.Node]:
    """Walks back from a first layer through the block's plain ops: (the entering tensor, its reader)."""
    reader, data = layer, layer.all_input_nodes[0]
    while (data.op != "placeholder" and len(data.all_input_nodes) == 1 and len(data.users) == 1
           and not index.is_mixing(data) and _inside(module_path(data), block)):
        reader, data = data, data.all_input_nodes[0]
    return data, reader


def _shiftable(index: GraphIndex, data: fx.Node, mixing_bits: int) -> bool:
    shape = index.shape(data)
    if shape is None or len(shape) < 3 or not (index.ancestors[data] | 1 << index.position[data]) & mixing_bits:
        return False  # not a feature map, or the image itself
    if index.batch is not None and shape[0] != index.batch:
        return False  # windows or patches folded into the batch: not one entry per frame
    per_sample = 1
    for size in shape[1:]:
        per_sample *= size
    return per_sample not in shape[1:]  # pooled features (a squeeze-excite input, a head): no extent


def block_entries(index: GraphIndex) -> list[BlockEntry]:
    """One entry per block (or group of sibling blocks), in graph order of the entering tensor."""
    mixing = [n for n in index.nodes if index.is_mixing(n) and n.all_input_nodes]
    mixing_bits = 0
    for node in mixing:
        mixing_bits |= 1 << index.position[node]
    readers: dict[tuple[str, fx.Node], list[fx.Node]] = {}
    entry_blocks: dict[tuple[str, fx.Node], list[str]] = {}
    for block, nodes in _blocks(mixing).items():
        for node in nodes:
            if any(index.reaches(other, node) for other in nodes if other is not node):
                continue  # not a first layer of its block
            data, reader = _entry_of(index, node, block)
            if not _shiftable(index, data, mixing_bits):
                continue
            key = block
            if not _inside(module_path(data), block):  # climb to the outermost module data enters
                while key and _parent(key) and not _inside(module_path(data), _parent(key)):
                    key = _parent(key)
            entry_blocks.setdefault((key, data), []).append(block)
            if reader not in readers.setdefault((key, data), []):
                readers[(key, data)].append(reader)
    entries = []
    for (key, data), firsts in readers.items():
        blocks = entry_blocks[(key, data)]
        block = common_prefix(blocks) if len(blocks) > 1 else blocks[0]
        shape = index.shape(data)
        assert shape is not None, data  # entries are chosen among tensors with a shape
        layers = [n for n in mixing if any(index.reaches(f, n) for f in firsts)][:1]
        channel_dim = index.channel_dim(shape, layers)
        entries.append(BlockEntry(
            block=block or data.name, entry=data.name,
            first_readers=tuple(n.name for n in firsts),
            other_readers=tuple(u.name for u in data.users if u not in firsts),
            shape=shape, channels=int(shape[channel_dim]), channel_dim=channel_dim if channel_dim == 1 else -1,
        ))
    order = {node.name: index.position[node] for node in index.nodes}
    return sorted(entries, key=lambda e: order[e.entry])
