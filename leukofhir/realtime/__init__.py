"""The near-real-time path: FHIR rest-hook Subscriptions (`subscribe`) and their receiver (`listen`)."""
