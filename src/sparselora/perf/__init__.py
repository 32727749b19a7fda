"""How we measure the engine: measured step time (`bench`), step time composed from measured
parts for models too large to run whole (`composed`, its parts model in `parts`), what both
share (`common`) and the report writers (`report`). Functions take a config and return results;
the command line lives in `sparselora.cli.perf_commands`."""
