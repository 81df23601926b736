"""The ``pas`` command: a thin shell over the core (no business logic here)."""
