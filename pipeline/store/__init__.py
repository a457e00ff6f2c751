"""Pool storage: Arrow schemas, atomic Parquet tables, completion markers, WebDataset shards."""
