package org.leukofhir.fhirserver;

import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.batch2.jobs.imprt.BulkDataImportProvider;
import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings.ClientIdStrategyEnum;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings.IdStrategyEnum;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import org.hibernate.cfg.AvailableSettings;
import org.hibernate.engine.spi.SessionFactoryImplementor;
import org.hibernate.resource.jdbc.spi.StatementInspector;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.beans.factory.config.BeanPostProcessor;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.autoconfigure.orm.jpa.JpaProperties;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

import org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType;

import javax.sql.DataSource;
import java.sql.Connection;
import java.sql.SQLException;
import java.util.HashMap;
import java.util.Map;

@Configuration
public class FhirServerConfig {

	// Storage behaviour of the server; values come from application.yaml (hapi.fhir.*).
	@Bean
	public JpaStorageSettings jpaStorageSettings(
			@Value("${hapi.fhir.reuse_cached_search_results_millis:0}") long reuseCachedSearchResultsMillis,
			@Value("${hapi.fhir.enforce_referential_integrity_on_write:true}") boolean referentialIntegrityOnWrite,
			@Value("${hapi.fhir.bulk_export_enabled:true}") boolean bulkExportEnabled,
			@Value("${hapi.fhir.include_hash_identity_for_token_searches:true}") boolean hashIdentityForTokens) {
		JpaStorageSettings settings = new JpaStorageSettings();
		settings.setReuseCachedSearchResultsForMillis(reuseCachedSearchResultsMillis);
		settings.setEnforceReferentialIntegrityOnWrite(referentialIntegrityOnWrite);
		settings.setAutoCreatePlaceholderReferenceTargets(false);
		// Client ids may be anything (Synthea UUIDs, purely numeric ids); server-assigned ids are
		// UUIDs so that they can never collide with a client-assigned one.
		settings.setResourceClientIdStrategy(ClientIdStrategyEnum.ANY);
		settings.setResourceServerIdStrategy(IdStrategyEnum.UUID);
		settings.setEnableTaskBulkExportJobExecution(bulkExportEnabled);
		// Run small batch2 jobs ($export) without waiting for the next maintenance pass.
		settings.setJobFastTrackingEnabled(true);
		// Token searches also name their parameter's HASH_IDENTITY (a HAPI option, off by default): H2 then joins
		// HFJ_SPIDX_TOKEN through IDX_SP_TOKEN_RESID_V2, one seek per row. Without it, `code=<32 codes>` beside a
		// date or 100 subjects took 10-100 s on 20,000 Observations (H2QueryPlans explains why).
		settings.setIncludeHashIdentityForTokenSearches(hashIdentityForTokens);
		return settings;
	}

	// Batch2 maintenance moves $export jobs from step to step. HAPI runs it once a minute, so a small
	// export took about 3 minutes; every 2 s it takes 2-6 s. Set before the scheduler registers the job.
	@Bean
	public static BeanPostProcessor batch2MaintenanceInterval(
			@Value("${hapi.fhir.batch2_maintenance_interval_millis:2000}") long intervalMillis) {
		return new BeanPostProcessor() {
			@Override
			public Object postProcessBeforeInitialization(Object bean, String beanName) {
				if (bean instanceof JobMaintenanceServiceImpl maintenance) {
					maintenance.setScheduledJobFrequencyMillis(intervalMillis);
				}
				return bean;
			}
		};
	}

	// R4 rest-hook subscriptions (leukofhir subscribe / listen). HAPI activates only the channel types listed
	// here (the dstu2 enum serves every FHIR version); with none it logs "Subscriptions are disabled".
	// Changed resources are queued in the database and handed to matching every `submission interval`
	// (HAPI's default 5000 ms); at 1000 ms a lab result is delivered about 1 s after its write (measured).
	// A new Subscription goes through the same queue: active within about 1 s. (HAPI's "queue Subscription
	// changes immediately" submits before the write commits, fails once with HAPI-2001 and retries 1 s
	// later: no faster, and an error in the log per Subscription.) In-memory matching (HAPI's default,
	// stated because the latency depends on it) answers token criteria without a database query per change.
	@Bean
	public SubscriptionSettings subscriptionSettings(
			@Value("${hapi.fhir.subscription.resthook_enabled:true}") boolean restHookEnabled,
			@Value("${hapi.fhir.subscription.submission_interval_millis:1000}") long submissionIntervalMillis) {
		SubscriptionSettings settings = new SubscriptionSettings();
		if (restHookEnabled) {
			settings.addSupportedSubscriptionType(SubscriptionChannelType.RESTHOOK);
		}
		settings.setSubscriptionIntervalInMs(submissionIntervalMillis);
		settings.setEnableInMemorySubscriptionMatching(true);
		return settings;
	}

	// The subscription processor wires an e-mail delivery listener whatever the supported types are; e-mail is
	// not one of ours, so a sender that can never be reached is enough.
	@Bean
	public IEmailSender emailSender() {
		return details -> {
			throw new UnsupportedOperationException("e-mail subscriptions are not enabled on this server");
		};
	}

	// No partitioning: JpaConfig still needs the settings bean.
	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	// HAPI's persistence unit (its entity classes) on Boot's DataSource, with spring.jpa.properties.*; on H2, HAPI's
	// SQL passes through H2QueryPlans (unless leukofhir.h2_query_plans is false).
	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource,
			JpaProperties jpaProperties,
			@Value("${leukofhir.h2_query_plans:true}") boolean h2QueryPlans) throws SQLException {
		LocalContainerEntityManagerFactoryBean emf =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		emf.setPersistenceUnitName("HAPI_PU");
		emf.setDataSource(dataSource);
		Map<String, Object> properties = new HashMap<>(jpaProperties.getProperties());
		if (h2QueryPlans && isH2(dataSource)) {
			properties.put(AvailableSettings.STATEMENT_INSPECTOR, new H2QueryPlans());
		}
		emf.setJpaPropertyMap(properties);
		return emf;
	}

	// Once HAPI's tables exist (the entity manager factory has run hbm2ddl): H2QueryPlans' index, then H2's plans of
	// the pipeline's searches through the statement inspector Hibernate really uses, logged ("H2 query plans: ...
	// ok", or a warning per search).
	@Bean
	public H2QueryPlans.PlanCheck h2QueryPlanCheck(
			EntityManagerFactory entityManagerFactory,
			DataSource dataSource,
			JpaStorageSettings storageSettings,
			@Value("${leukofhir.h2_query_plans:true}") boolean h2QueryPlans) throws SQLException {
		if (!isH2(dataSource)) {
			return new H2QueryPlans.PlanCheck(Map.of());
		}
		if (h2QueryPlans) {
			H2QueryPlans.createIndex(dataSource);
		}
		StatementInspector inspector = entityManagerFactory.unwrap(SessionFactoryImplementor.class)
				.getSessionFactoryOptions().getStatementInspector();
		return new H2QueryPlans.PlanCheck(H2QueryPlans.checkPlans(
				dataSource, inspector, storageSettings.isIncludeHashIdentityForTokenSearches()));
	}

	// On PostgreSQL (FHIR_DB=postgres), once HAPI's tables exist: the indexes and the statistics its plans of the
	// pipeline's searches rely on (PostgresChecks); the start fails without them.
	@Bean
	public PostgresChecks.Check postgresCheck(
			EntityManagerFactory entityManagerFactory,
			DataSource dataSource,
			@Value("${leukofhir.postgres_checks:true}") boolean postgresChecks) throws SQLException {
		if (!postgresChecks || !"PostgreSQL".equals(databaseProduct(dataSource))) {
			return new PostgresChecks.Check(java.util.List.of());
		}
		return PostgresChecks.check(dataSource);
	}

	private static boolean isH2(DataSource dataSource) throws SQLException {
		return "H2".equals(databaseProduct(dataSource));
	}

	private static String databaseProduct(DataSource dataSource) throws SQLException {
		try (Connection connection = dataSource.getConnection()) {
			return connection.getMetaData().getDatabaseProductName();
		}
	}

	// HAPI's services look up "transactionManager"; bind it to HAPI's entity manager factory.
	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		return new JpaTransactionManager(entityManagerFactory);
	}

	// The FHIR REST servlet at /fhir/*: all R4 resource types, system operations (transaction,
	// history), $export, paging through stored searches, and a capability statement from the DAOs.
	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServlet(
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			IJpaSystemProvider systemProvider,
			BulkDataExportProvider bulkDataExportProvider,
			BulkDataImportProvider bulkDataImportProvider,
			DatabaseBackedPagingProvider pagingProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			@Value("${hapi.fhir.bulk_export_enabled:true}") boolean bulkExportEnabled,
			@Value("${hapi.fhir.bulk_import_enabled:false}") boolean bulkImportEnabled,
			@Value("${hapi.fhir.default_page_size:20}") int defaultPageSize,
			@Value("${hapi.fhir.max_page_size:500}") int maxPageSize) {
		RestfulServer server = new RestfulServer(systemDao.getContext());
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		if (bulkExportEnabled) {
			server.registerProvider(bulkDataExportProvider);
		}
		// Bulk Data $import (HAPI fetches NDJSON files from URLs it is given): off, as in HAPI's own starter; on for
		// benchmarks/load_bench.py --import, which measures it against `leukofhir load`.
		if (bulkImportEnabled) {
			server.registerProvider(bulkDataImportProvider);
		}
		pagingProvider.setDefaultPageSize(defaultPageSize);
		pagingProvider.setMaximumPageSize(maxPageSize);
		server.setPagingProvider(pagingProvider);
		server.setServerConformanceProvider(new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport));

		ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(server, "/fhir/*");
		registration.setName("fhir");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
