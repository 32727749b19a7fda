"""How we measure the engine: measured step time (`bench`), step time composed from measured
parts for models too large to run whole (`composed`), and the report writers."""
