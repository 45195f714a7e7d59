"""Find, take out and replace the final fully-connected layer of a classification network.

A *path* is the list of attribute names from the root module to a submodule, e.g.
``['classifier', '6']`` for the last layer of torchvision's VGG-16.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from recognite.utils.validate import check_int


def get_module_at_path(model: nn.Module, path: Sequence[str]) -> nn.Module:
    """Return the submodule of ``model`` reached by following ``path``.

    Args:
        model: The root module.
        path: Attribute names from the root, e.g. ``['classifier', '6']``. An empty path
            returns ``model`` itself.

    Raises:
        ValueError: If a name along the path is not a child module.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 4)))
    >>> get_module_at_path(net, ['1', '1'])
    Linear(in_features=3, out_features=4, bias=True)
    """
    module = model
    for depth, name in enumerate(path):
        children = dict(module.named_children())
        if name not in children:
            raise ValueError(
                f"Path {list(path)!r} is invalid: {type(module).__name__} at "
                f"{list(path[:depth])!r} has no child {name!r}; its children are {sorted(children)}."
            )
        module = children[name]
    return module


def set_module_at_path(model: nn.Module, path: Sequence[str], new_module: nn.Module) -> None:
    """Replace the submodule at ``path`` with ``new_module`` (in place).

    Args:
        model: The root module.
        path: Attribute names from the root; must not be empty.
        new_module: The module to put there.

    Raises:
        ValueError: If ``path`` is empty or does not lead to an existing submodule.
    """
    if len(path) == 0:
        raise ValueError("set_module_at_path needs a non-empty path; cannot replace the root module.")
    parent = get_module_at_path(model, path[:-1])
    get_module_at_path(parent, path[-1:])  # raises a clear error if the leaf does not exist
    setattr(parent, path[-1], new_module)


def get_path_to_ultimate_classifier(model: nn.Module) -> list[str]:
    """Return the path to the network's final fully-connected layer.

    The final layer is the last child module if it is an ``nn.Linear``, or the last
    ``nn.Linear`` inside the last child if that child is an ``nn.Sequential``.

    Args:
        model: A classification network, e.g. a torchvision model.

    Returns:
        The path, e.g. ``['fc']`` for ResNets or ``['classifier', '6']`` for VGG.

    Raises:
        ValueError: If the network does not end in such a linear layer.

    >>> from torch import nn
    >>> get_path_to_ultimate_classifier(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(),
    ...                                               nn.Sequential(nn.Linear(8, 4), nn.ReLU())))
    ['2', '0']
    """
    children = list(model.named_children())
    if not children:
        raise ValueError(f"{type(model).__name__} has no child modules, so it has no final classifier.")
    last_name, last_child = children[-1]
    if isinstance(last_child, nn.Linear):
        return [last_name]
    if isinstance(last_child, nn.Sequential):
        linear_names = [name for name, child in last_child.named_children() if isinstance(child, nn.Linear)]
        if linear_names:
            return [last_name, linear_names[-1]]
    raise ValueError(
        f"{type(model).__name__} does not end in a linear classifier: its last child "
        f"{last_name!r} is a {type(last_child).__name__}, not an nn.Linear or an nn.Sequential "
        "that contains one."
    )


def get_ultimate_classifier(model: nn.Module) -> nn.Linear:
    """Return the network's final fully-connected layer (see :func:`get_path_to_ultimate_classifier`)."""
    return get_module_at_path(model, get_path_to_ultimate_classifier(model))  # type: ignore[return-value]


def split_backbone_classifier(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Take the final fully-connected layer out of ``model``.

    The layer is replaced by ``nn.Identity`` *in place*, so the returned backbone is ``model``
    itself and outputs the features that used to feed the classifier.

    Args:
        model: A classification network ending in a linear layer.

    Returns:
        ``(backbone, classifier)``.

    >>> import torch
    >>> from torch import nn
    >>> backbone, clf = split_backbone_classifier(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 5)))
    >>> backbone(torch.zeros(4, 2)).shape, clf.out_features
    (torch.Size([4, 3]), 5)
    """
    path = get_path_to_ultimate_classifier(model)
    classifier = get_module_at_path(model, path)
    set_module_at_path(model, path, nn.Identity())
    return model, classifier  # type: ignore[return-value]


def update_classifier(model: nn.Module, num_classes: int, bias: bool = False) -> nn.Module:
    """Replace the final fully-connected layer with a new one of ``num_classes`` outputs.

    Works on a plain classification network (its final linear layer is replaced) and on a
    :class:`~recognite.model.Recognizer` (its ``classifier`` is replaced).

    Args:
        model: The network; modified in place.
        num_classes: Number of outputs of the new layer (>= 1).
        bias: Whether the new layer has a bias term.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: If ``num_classes`` is not a positive integer.
    """
    check_int(num_classes, "num_classes", minimum=1)
    set_classifier = getattr(model, "set_classifier", None)
    if callable(set_classifier):  # a Recognizer (duck-typed: recognizer.py imports this module)
        set_classifier(num_classes, bias=bias)
        return model
    path = get_path_to_ultimate_classifier(model)
    old = get_module_at_path(model, path)
    new = nn.Linear(old.in_features, num_classes, bias=bias)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    set_module_at_path(model, path, new)
    return model
