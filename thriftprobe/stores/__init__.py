"""Where durable state lives: ``mysql`` (connections and schema), ``appkeys`` and ``audit`` in
MySQL, node ``settings`` in Redis or Redis Cluster. Stores know the shared vocabulary only."""
