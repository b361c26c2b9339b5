"""In-repo fakes of each boundary, for unit tests only."""
