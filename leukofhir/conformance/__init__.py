"""The project's conformance resources (Flag profile, CTCAE grade extension, conditions' value set): JSON templates."""
