"""Pure numerical helpers (no file I/O): tensor algebra and image geometry."""
