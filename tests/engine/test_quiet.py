"""overdrive.quiet drops exactly the known-harmless records, only inside its block."""

import logging

from overdrive.quiet import known_harmless_noise

HARMLESS = ("Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so:"
            " Could not load this library")
ENUM = ("<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
        "torch.compile as an opaque value type. Calling register_constant() on Enum "
        "subclasses is deprecated and will be an error in a future release.")


def test_only_known_harmless_records_are_dropped_inside_the_block(caplog):
    ao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    with caplog.at_level(logging.WARNING):
        with known_harmless_noise():
            ao.warning(HARMLESS)
            pytree.warning(ENUM)
            ao.warning("Failed to load /somewhere/else/libfoo.so: missing")  # not known
            logging.getLogger("other").warning(HARMLESS)  # another logger: kept
        ao.warning(HARMLESS)  # outside the block: kept
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert messages == [("torchao", "Failed to load /somewhere/else/libfoo.so: missing"),
                        ("other", HARMLESS), ("torchao", HARMLESS)]
    assert not ao.filters and not pytree.filters
