"""CPU fast paths of zpruner's methods (docstring completed below)."""
