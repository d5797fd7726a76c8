"""The teacher: classical DWI processing that produces m2m's training targets."""
