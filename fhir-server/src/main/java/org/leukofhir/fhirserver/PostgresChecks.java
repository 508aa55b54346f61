package org.leukofhir.fhirserver;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import javax.sql.DataSource;
import java.sql.Connection;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * What PostgreSQL needs to answer the pipeline's searches with index seeks, checked at start-up.
 *
 * <p>Unlike H2 (H2QueryPlans), PostgreSQL plans HAPI 8.8's SQL for these searches well with HAPI's own indexes and no
 * rewrite: measured with EXPLAIN (ANALYZE, BUFFERS) on 122,500 and 1,225,000 resources (benchmarks/pg_plans.py, README
 * "The local FHIR server"), every statement seeks an index and takes milliseconds. Its choice is cost-based, so it
 * rests on two things this class checks: the indexes those plans use ({@link #INDEXES}, which HAPI's schema creation
 * makes and a hand-made or half-migrated schema may lack), and fresh statistics (autovacuum, which ANALYZEs tables
 * as they grow: a table planned as empty after a bulk load is read whole). A missing index or autovacuum turned off
 * fails the start with a message saying which.
 */
public class PostgresChecks {

	private static final Logger log = LoggerFactory.getLogger(PostgresChecks.class);

	/**
	 * Index name → its table and leading columns, as the measured plans use them (what each serves in the comment).
	 */
	static final Map<String, String[]> INDEXES = new LinkedHashMap<>();

	static {
		// `code=<32 codes>` joined to `date`, `_lastUpdated` or `subject`: merge or nested-loop joins on RES_ID.
		INDEXES.put("idx_sp_token_resid_v2", new String[] {"hfj_spidx_token", "res_id", "hash_sys_and_value"});
		INDEXES.put("idx_sp_date_resid_v2", new String[] {"hfj_spidx_date", "res_id", "hash_identity"});
		// `date=ge..&date=lt..` alone (medication resources, the project's Flags by period).
		INDEXES.put("idx_sp_date_ord_hash_high_v2", new String[] {"hfj_spidx_date", "hash_identity"});
		// `subject=<100 patients>`, `_revinclude=DiagnosticReport:result` and `Observation:has-member`.
		INDEXES.put("idx_rl_tgt_v2", new String[] {"hfj_res_link", "target_resource_id", "src_path"});
		// `_include=MedicationStatement:medication` (the links of a page's resources).
		INDEXES.put("idx_rl_src", new String[] {"hfj_res_link", "src_resource_id"});
		// `_lastUpdated` windows, joined on RES_ID, and the id lookups of `_id=` and of every write.
		INDEXES.put("idx_res_resid_updated", new String[] {"hfj_resource", "res_id", "res_updated"});
		INDEXES.put("idx_res_type_fhir_id", new String[] {"hfj_resource", "res_type", "fhir_id"});
		// `_tag=` (the project's Flags).
		INDEXES.put("idx_restag_tagid", new String[] {"hfj_res_tag", "res_id", "tag_id"});
		INDEXES.put("idx_tag_def_tp_cd_sys", new String[] {"hfj_tag_def", "tag_type", "tag_code", "tag_system"});
	}

	/** The start-up check's outcome: what is missing (empty when everything is there). */
	public record Check(List<String> problems) {
	}

	/** The problems found: missing indexes, indexes whose leading columns differ, autovacuum or its counters off. */
	static List<String> problems(Connection connection) throws SQLException {
		List<String> problems = new ArrayList<>();
		try (PreparedStatement columns = connection.prepareStatement(
				"SELECT t.relname, a.attname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
						+ " JOIN pg_class t ON t.oid = x.indrelid"
						+ " JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY (x.indkey)"
						+ " WHERE i.relname = ? AND pg_table_is_visible(i.oid)"
						+ " ORDER BY array_position(x.indkey::int2[], a.attnum)")) {
			for (Map.Entry<String, String[]> index : INDEXES.entrySet()) {
				String[] wanted = index.getValue();
				columns.setString(1, index.getKey());
				String table = null;
				List<String> found = new ArrayList<>();
				try (ResultSet rows = columns.executeQuery()) {
					while (rows.next()) {
						table = rows.getString(1);
						found.add(rows.getString(2));
					}
				}
				List<String> leading = List.of(wanted).subList(1, wanted.length);
				String expected = index.getKey() + " ON " + wanted[0] + "(" + String.join(", ", leading) + ", ...)";
				if (table == null) {
					problems.add("index " + expected + " is missing");
				} else if (!table.equals(wanted[0]) || found.size() < leading.size()
						|| !found.subList(0, leading.size()).equals(leading)) {
					problems.add("index " + index.getKey() + " is on " + table + found + ", not " + expected);
				}
			}
		}
		try (Statement statement = connection.createStatement()) {
			for (String setting : List.of("autovacuum", "track_counts")) {
				try (ResultSet rows = statement.executeQuery("SHOW " + setting)) {
					if (rows.next() && !"on".equals(rows.getString(1))) {
						problems.add(setting + " is " + rows.getString(1) + " (the plans rely on the statistics that "
								+ "autovacuum's ANALYZE keeps fresh as tables grow)");
					}
				}
			}
		}
		return problems;
	}

	/** Logs "PostgreSQL query plans: ... ok", or throws with every problem: the server does not start without them. */
	static Check check(DataSource dataSource) throws SQLException {
		List<String> problems;
		try (Connection connection = dataSource.getConnection()) {
			problems = problems(connection);
		}
		if (!problems.isEmpty()) {
			throw new IllegalStateException("PostgreSQL is not ready for the pipeline's searches: "
					+ String.join("; ", problems) + " (leukofhir.postgres_checks: false skips this check)");
		}
		log.info("PostgreSQL query plans: the {} indexes of the pipeline's searches ({}), autovacuum ok",
				INDEXES.size(), String.join(", ", INDEXES.keySet()));
		return new Check(problems);
	}
}
