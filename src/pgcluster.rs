//! Throwaway local PostgreSQL clusters (tests and `floodgate demo`).
