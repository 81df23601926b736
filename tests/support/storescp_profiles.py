"""storescp association profiles (DCMTK's format, as in its ``storescp.cfg``): a destination
that accepts one storage class only, in the uncompressed syntaxes, for tests of what a
retrieve does with the classes a workstation refuses."""

from __future__ import annotations


def one_class_profile(name: str, sop_class: str) -> str:
    """A profile named ``name`` accepting only ``sop_class`` (DCMTK's keyword, e.g.
    ``CTImageStorage``); storescp takes it with ``-xf FILE name``."""
    return f"""\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[{name}]
PresentationContext1 = {sop_class}\\Uncompressed

[[Profiles]]
[{name}]
PresentationContexts = {name}
"""
