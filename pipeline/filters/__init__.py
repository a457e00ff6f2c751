"""DataComp-style filters ("DataComp: In search of the next generation of multimodal datasets") and
SemDeDup deduplication: per-sample scores first (``tables/filters``), then one decision step that
turns a named recipe into ``keep`` and ``drop_reason`` (``tables/decisions``)."""
