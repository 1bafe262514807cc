"""``dataclass``, with the class's methods made when it is first used rather than at import.

Python 3.11's ``dataclasses.dataclass`` writes each class's ``__init__``, ``__repr__``,
``__eq__`` (and, frozen, ``__setattr__``, ``__delattr__``, ``__hash__``) as source text and
compiles it: ~0.4 ms a class here. Measured (seventeenth session): the 43 dataclasses the
modules of a ``servers revert`` define cost 17 ms of its 67 ms of imports, and that
command makes instances of 16 of them. Every command pays for the classes its modules
define; each now pays only for the ones it uses.

A class decorated here is the same class, its fields as annotated; what
``dataclasses.dataclass`` would add to it is added, by ``dataclasses.dataclass`` itself
with the same options, the first time any of these happens:

- an instance is made (a stand-in ``__new__`` makes the methods first: Python looks up
  ``__init__`` only once ``__new__`` has returned, so a thread making an instance while
  another makes the class waits for it, and never meets a class half made);
- ``__dataclass_fields__`` is read: ``dataclasses.fields``, ``is_dataclass``, ``asdict``,
  ``replace``, or a subclass being made into a dataclass, read it;
- ``materialize(cls)`` or ``materialize_all()`` is called: code with a window the guest
  feels (a freeze, a memory save's pause) makes the classes used inside it first, and the
  command server makes them all before it forks its commands.

Until then no instance exists, so nothing can see the difference. Made eagerly, as
``dataclasses.dataclass`` does, are the classes this cannot defer: ``slots=True`` (that
makes a new class), ``init=False`` (the stand-in's ``__new__`` would let ``object.__init__``
take arguments it refuses), a class with a base (whose own ``__new__`` or fields would have to
be dealt with), or with a ``__new__`` of its own.

Type checkers see ``dataclasses.dataclass`` itself (the ``TYPE_CHECKING`` import), which
the runtime one matches once a class is used.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from typing import TYPE_CHECKING, Any

__all__ = ["dataclass", "materialize", "materialize_all"]

_FIELDS = "__dataclass_fields__"
_pending: dict[type, dict[str, Any]] = {}  # class -> its dataclass options
_making = threading.RLock()  # re-entered: a subclass's bases are made first, inside


class _PendingFields:
    """The class's ``__dataclass_fields__`` until it is made: reading it makes the class."""

    def __init__(self, cls: type) -> None:
        self._cls = cls

    def __get__(self, instance: object, owner: type) -> Any:
        _materialize(self._cls)
        return getattr(owner, _FIELDS)


def _materialize(cls: type) -> None:
    with _making:
        options = _pending.pop(cls, None)
        if options is None:
            return  # made already (or by another thread meanwhile)
        generated_doc = not cls.__doc__
        # It writes __dataclass_fields__ last, over the stand-in, in one assignment.
        made: type = dataclasses.dataclass(cls, **options)
        assert made is cls  # without slots=True, dataclass() decorates the class in place
        cls.__new__ = _object_new(cls)  # type: ignore[method-assign]
        if generated_doc:  # dataclass() wrote the stand-in's (*args, **kwargs) into it
            cls.__doc__ = cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")


def _object_new(cls: type) -> Any:
    """``object.__new__`` for a made class, its arguments left to ``__init__``. Not a
    deletion of the stand-in: CPython then calls ``object.__new__`` with the arguments
    too, which refuses them (a class whose ``__new__`` was replaced never gets the plain C
    one back); this costs ~0.13 µs an instance here. Its signature is ``__init__``'s,
    which is what ``inspect.signature`` reads for the class."""

    def __new__(subclass: type, *_args: Any, **_kwargs: Any) -> Any:
        return object.__new__(subclass)

    __new__.__qualname__ = f"{cls.__qualname__}.__new__"
    __new__.__signature__ = inspect.signature(cls.__init__)  # type: ignore[attr-defined, misc]
    return staticmethod(__new__)


def _defer(cls: type, options: dict[str, Any]) -> type:
    if (options.get("slots") or options.get("init") is False or cls.__bases__ != (object,)
            or "__new__" in cls.__dict__):
        return dataclasses.dataclass(cls, **options)  # see the module's docstring

    def __new__(subclass: type, *_args: Any, **_kwargs: Any) -> Any:
        _materialize(cls)
        return object.__new__(subclass)

    __new__.__qualname__ = f"{cls.__qualname__}.__new__"
    cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]
    setattr(cls, _FIELDS, _PendingFields(cls))
    _pending[cls] = options
    return cls


def materialize(*classes: type) -> None:
    """Make these classes now (any already made is left as it is): for code that must not
    pay ~0.4 ms a class later, inside a window the guest feels."""
    for cls in classes:
        _materialize(cls)


def materialize_all() -> None:
    """Make every class defined so far: a process that forks (the command server) makes
    them once in the parent instead of once in each child."""
    while _pending:
        with _making:
            if _pending:
                _materialize(next(iter(_pending)))


if TYPE_CHECKING:
    from dataclasses import dataclass
else:
    def dataclass(cls: type | None = None, /, **options: Any) -> Any:
        """``dataclasses.dataclass``, its work deferred to the class's first use."""
        if cls is None:
            return lambda cls: _defer(cls, options)
        return _defer(cls, options)
