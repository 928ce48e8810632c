"""The cluster layer: one entry point in front of many engine replicas, on Ray Serve.

    client --https--> Serve's HTTP proxy (every node) -> Gateway (entry point, stateless)
                          --Ray: one call per signalling request--> EngineReplica k (node k)
    client <----------------- RTP/RTCP, data channel: direct -----------------> EngineReplica k

Each `EngineReplica` runs the single server's app as it is (`livediff.server.create_app`: engine,
scheduler, transport) and hosts its sessions' peers; the gateway only moves signalling requests
(offers, trickle, WHEP, the REST API) to it, so media never passes through Ray or the entry point.
Session ids start with their replica's route key (`ServerSettings.session_id_prefix`), so any
gateway process sends a session's later requests to its replica with no shared table
(`routing.SessionRouter`); new sessions go to the replica with the most free room.
Ray Serve places replicas on GPUs, health-checks and restarts them, and scales them on sessions
(`autoscale.sessions_policy`); a replica it stops drains first (its sessions stream to their end).

Modules: `settings` (flags), `calls` (an HTTP request as Ray carries it), `replica`, `routing`,
`autoscale`, `gateway`, `metrics` (one scrape for every replica), `app` (the Serve application),
`run` (`livediff serve --cluster`).
"""
