# HAPI FHIR JPA server image with a health probe: the official image is distroless (no shell or curl),
# so a tiny Java class compiled here does the HTTP check with the image's own JRE.
FROM eclipse-temurin:17-jdk AS probe
COPY docker/HealthCheck.java /src/HealthCheck.java
RUN javac -d /probe /src/HealthCheck.java

FROM hapiproject/hapi:v8.8.0-1
COPY --from=probe /probe/ /app/probe/
