"""ZeRO: one sharding mechanism (flat sharded parameter groups driven by module hooks), with the stage as policy."""
