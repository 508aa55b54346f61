package org.leukofhir.fhirserver;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchClientAutoConfiguration;
import org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration;
import org.springframework.boot.autoconfigure.flyway.FlywayAutoConfiguration;
import org.springframework.boot.autoconfigure.quartz.QuartzAutoConfiguration;
import org.springframework.boot.autoconfigure.thymeleaf.ThymeleafAutoConfiguration;
import org.springframework.context.annotation.Import;

/**
 * Local HAPI FHIR JPA server (R4) for leukofhir development and tests.
 * Base URL: http://127.0.0.1:${FHIR_PORT:8080}/fhir
 */
@SpringBootApplication(exclude = {
	// HAPI runs its own Quartz schedulers; Boot's would be a second, unused one.
	QuartzAutoConfiguration.class,
	// Thymeleaf, Flyway and the Elasticsearch clients arrive transitively with HAPI; none is used here.
	ThymeleafAutoConfiguration.class,
	FlywayAutoConfiguration.class,
	ElasticsearchClientAutoConfiguration.class,
	ElasticsearchRestClientAutoConfiguration.class
})
@Import({
	JpaR4Config.class, // R4 FhirContext, DAOs, resource providers, system provider (imports JpaConfig)
	HapiJpaConfig.class, // paging provider, fulltext/stale-search services, resource-supported svc
	ThreadPoolFactoryConfig.class, // thread pools for transaction bundles and batch jobs
	JpaBatch2Config.class, // batch2 job persistence and coordinator (runs $export jobs)
	Batch2JobsConfig.class, // batch2 job definitions, among them bulk export
	SubscriptionChannelConfig.class, // in-JVM message broker: batch2 work items and the subscription queues
	SubscriptionSubmitterConfig.class, // changed resources -> matching queue (validates Subscriptions on write)
	SubscriptionProcessorConfig.class // matching queue -> in-memory match -> rest-hook delivery
})
public class FhirServerApplication {

	public static void main(String[] args) {
		SpringApplication.run(FhirServerApplication.class, args);
	}
}
