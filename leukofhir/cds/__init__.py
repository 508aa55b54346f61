"""CDS Hooks 2.0: the leukopenia rules answered where clinicians decide (patient-view, order-sign)."""
