"""bbsnap.lazy_dataclass: a class is the dataclass ``dataclasses.dataclass`` makes, its
methods made at its first use, not at import."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import threading
from dataclasses import field

import pytest

from bbsnap import lazy_dataclass
from bbsnap.lazy_dataclass import dataclass, materialize_all


def _pending(cls: type) -> bool:
    return cls in lazy_dataclass._pending


def test_a_class_is_made_at_its_first_instance_and_behaves_as_a_dataclass():
    @dataclass(frozen=True)
    class Point:
        x: int
        tags: list[str] = field(default_factory=list)

    @dataclasses.dataclass(frozen=True)
    class Eager:
        x: int
        tags: list[str] = field(default_factory=list)

    assert _pending(Point) and "__eq__" not in Point.__dict__
    point = Point(1, ["a"])
    assert not _pending(Point)
    assert repr(point) == "test_a_class_is_made_at_its_first_instance_and_behaves_as_a_" \
        "dataclass.<locals>.Point(x=1, tags=['a'])"
    assert point == Point(1, ["a"]) and point != Point(2)
    assert Point(3).tags == [] and Point(3).tags is not Point(3).tags
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.x = 2  # type: ignore[misc]
    assert hash(Point(1, ("a",))) == hash(Point(1, ("a",)))  # type: ignore[arg-type]
    assert Point.__match_args__ == Eager.__match_args__ == ("x", "tags")
    assert sorted(set(Point.__dict__) - {"__new__"}) == sorted(Eager.__dict__)
    assert inspect.signature(Point) == inspect.signature(Eager)
    assert Point.__doc__ == Eager.__doc__.replace("Eager", "Point")  # type: ignore[union-attr]


@pytest.mark.parametrize("use", [dataclasses.fields, dataclasses.is_dataclass])
def test_reading_its_fields_makes_the_class_first(use):
    @dataclass
    class Row:
        a: int
        b: str = "b"

    assert _pending(Row)
    assert use(Row)
    assert not _pending(Row)
    row = object.__new__(Row)  # as the catalogue makes its rows' Images
    row.__dict__.update(a=1, b="x")
    assert row == Row(1, "x") and dataclasses.asdict(row) == {"a": 1, "b": "x"}
    assert dataclasses.replace(row, b="y") == Row(1, "y")


def test_a_subclass_is_made_at_once_its_base_first():
    @dataclass(frozen=True)
    class Base:
        a: int

    @dataclass(frozen=True)
    class Child(Base):
        b: int = 2

        def __post_init__(self) -> None:
            object.__setattr__(self, "b", self.b * 10)

    child = Child(1)
    assert (child.a, child.b) == (1, 20)
    assert not _pending(Base) and not _pending(Child)
    assert [f.name for f in dataclasses.fields(Child)] == ["a", "b"]
    assert Base(1) != child  # a dataclass's __eq__ compares the classes too


def test_what_cannot_be_deferred_is_made_at_once():
    @dataclass(slots=True)
    class Slotted:
        a: int

    @dataclass
    class OwnNew:
        a: int

        def __new__(cls, *args: object, **kwargs: object) -> "OwnNew":
            return super().__new__(cls)

    @dataclass(init=False)
    class NoInit:
        a: int = 0

    for cls in (Slotted, OwnNew, NoInit):
        assert not _pending(cls) and "__eq__" in cls.__dict__
    assert Slotted.__slots__ == ("a",) and OwnNew(3).a == 3 and NoInit().a == 0
    with pytest.raises(TypeError):
        NoInit(a=1)  # type: ignore[call-arg]


def test_a_class_with_its_own_init_is_deferred_all_the_same():
    @dataclass
    class OwnInit:
        a: int

        def __init__(self) -> None:
            self.a = 5

    assert _pending(OwnInit)
    assert OwnInit().a == 5 and OwnInit() == OwnInit()
    assert not inspect.signature(OwnInit).parameters
    with pytest.raises(TypeError):
        OwnInit(1)  # type: ignore[call-arg]


def test_threads_making_the_first_instances_at_once_make_the_class_once(monkeypatch):
    made = []
    real = dataclasses.dataclass

    def counted(cls, **options):
        made.append(cls)
        return real(cls, **options)

    @dataclass(frozen=True)
    class Shared:
        a: int

    monkeypatch.setattr(lazy_dataclass.dataclasses, "dataclass", counted)
    start = threading.Barrier(8)
    results: list[object] = []

    def make(value: int) -> None:
        start.wait()
        results.append(Shared(value))

    threads = [threading.Thread(target=make, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert made == [Shared]
    assert sorted(r.a for r in results) == list(range(8))  # type: ignore[attr-defined]


def test_materialize_all_leaves_nothing_to_make():
    @dataclass
    class One:
        a: int

    @dataclass
    class Two(One):
        b: int

    materialize_all()
    assert not lazy_dataclass._pending
    assert "__eq__" in One.__dict__ and "__eq__" in Two.__dict__


def test_importing_a_revert_makes_few_of_the_dataclasses_it_defines():
    """What the laziness is for: a command pays only for the classes it uses."""
    script = ("import bbsnap.cli.main, bbsnap.cli.servers, bbsnap.services.servers, "
              "bbsnap.services.memory_restore, bbsnap.hypervisor.libvirt_adapter\n"
              "from bbsnap import lazy_dataclass\n"
              "print(len(lazy_dataclass._pending))")
    pending = int(subprocess.run([sys.executable, "-c", script], check=True,
                                 capture_output=True, text=True).stdout)
    assert pending >= 30, f"only {pending} dataclasses left to make after the imports"


def test_materialize_makes_the_classes_named_and_no_other():
    @dataclass(frozen=True)
    class Wanted:
        a: int

    @dataclass(frozen=True)
    class Other:
        a: int

    lazy_dataclass.materialize(Wanted, Wanted)  # twice: the second is a no-op
    assert not _pending(Wanted) and "__eq__" in Wanted.__dict__
    assert _pending(Other)


def test_an_instance_asked_for_while_another_thread_makes_the_class_waits_for_it(monkeypatch):
    """While one thread is inside dataclasses.dataclass(), another making an instance must
    wait for the class, not meet it half made (before this design: object's __init__)."""
    real = dataclasses.dataclass
    outcome: list[object] = []

    @dataclass(frozen=True)
    class Raced:
        a: int

    def other() -> None:
        try:
            outcome.append(Raced(2))
        except Exception as exc:  # what a half-made class would raise
            outcome.append(exc)

    racer = threading.Thread(target=other)

    def slow(cls, **options):
        racer.start()
        racer.join(0.5)  # a racer that can get through a half-made class does so now
        return real(cls, **options)

    monkeypatch.setattr(lazy_dataclass.dataclasses, "dataclass", slow)
    first = Raced(1)
    racer.join()
    assert first == Raced(1) and outcome == [Raced(2)]
