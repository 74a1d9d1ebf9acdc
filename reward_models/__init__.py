"""Building what steering needs from any target and data: the TITA reward model (DPO), the FiSAO verifier's calibration, data sets in the field's formats, the grounding judge."""
