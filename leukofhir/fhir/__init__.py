"""FHIR REST client: session, auth, retries, paging, transactions."""
