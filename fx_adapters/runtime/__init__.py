"""The math and helpers that rewritten graphs call."""
