"""Ray backends: data-parallel workers and pipeline stages (``cd.ray_backend``), the Jobs API client, pipeline
training. Importing this package imports nothing from Ray; its modules do."""
