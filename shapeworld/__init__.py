"""ShapeWorld, the test world: coloured-shape scenes with exact ground truth and a planted co-occurrence bias, their export to COCO/POPE formats, and the training of the embedded models."""
