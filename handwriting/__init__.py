"""Online handwriting data: IAM-OnDB and a synthetic generator."""
