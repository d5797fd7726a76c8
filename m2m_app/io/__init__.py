"""Reading inputs with validation and writing outputs atomically."""
