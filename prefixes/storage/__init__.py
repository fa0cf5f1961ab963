"""Where prefixes live: the database engine and its migrations, the content-addressed tensor
store, compiled KV files, the device and host pool, and the collection of unused files."""
