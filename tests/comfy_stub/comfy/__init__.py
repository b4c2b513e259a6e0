"""Stand-in for the few ``comfy`` modules dpagg's nodes touch (tests only)."""
