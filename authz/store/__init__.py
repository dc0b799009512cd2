"""State in Redis/Valkey: per-user and per-session state, grants, one-time step-up state.

``interfaces`` declares what the rest of the service needs from a store; ``sessions`` is
the Redis implementation (one script per Check), ``memory`` the in-memory fake beside it;
``connections`` builds clients (URL, Sentinel, Cluster, embedded Valkey), ``fastredis`` is
the Check path's pipelined transport, ``crypto`` seals values at rest, ``lua/`` the scripts.
"""
