"""Benchmarks: quality (CHAIR, POPE) and speed of the engines, load and health of a running server, the
server's bounds on hostile input. The CLI's ``vlm-steer bench`` runs them; ShapeWorld supplies scenes."""
