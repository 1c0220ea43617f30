"""Helpers shared by the test modules (plain modules, not conftests; import what you use).

- `helpers.net`: `free_port` and `S3Server` (the handle of the `s3_server` fixture's moto server).
- `helpers.pipeline`: small corpora in every input format and `SMALL_JOB`, the embedding job's
  settings for the test session's Ray.
- `helpers.reindex`: a caption-and-picture corpus on S3 and readers of published versions.
- `helpers.serve`: the session's Serve HTTP proxy and readiness polling.
"""
