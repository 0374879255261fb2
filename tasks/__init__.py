"""Stage logic: plain functions, artifact in, artifact out. No Prefect imports here."""
