"""What a prefix is: its kinds, the adapter formats read and written, the model geometry it is
checked against, and its compilation to the keys and values the runner serves."""
