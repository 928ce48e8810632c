"""Clips and jobs: a video file in, a transformed MP4 out (`livediff run`, and `POST /api/jobs` on a server).

Modules: `clip` (probe, decode, encode with PyAV), `transcode` (a clip through a transform in batches),
`run` (the `livediff run` command), `store` (jobs in SQLite or PostgreSQL), `storage` (files),
`worker` (jobs through the server's scheduler), `webhooks` (signed state-change callbacks).
"""
