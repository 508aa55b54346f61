package org.leukofhir.fhirserver;

import org.hibernate.resource.jdbc.spi.StatementInspector;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import javax.sql.DataSource;
import java.sql.Connection;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Keeps H2 from answering HAPI's searches with index scans that grow with the whole database.
 *
 * <p>H2 2.3 costs {@code col IN (...)} on an index's first column as one equality, but its IndexCursor then seeks on
 * the IN values alone: equalities on the index's other columns are dropped (a join key among them), and an equality
 * on a later column that H2 lists before the IN makes it ignore the IN, so the "seek" reads the whole index. HAPI's
 * SQL for the pipeline's searches meets both (EXPLAIN ANALYZE on 20,000 Observations, README "The local FHIR server"):
 * <ul>
 *   <li>a token OR-list joined to another predicate (`code=a,b` with `date` or `subject`): HAPI's own
 *       {@code JpaStorageSettings.setIncludeHashIdentityForTokenSearches} (FhirServerConfig) makes H2 take the
 *       covering IDX_SP_TOKEN_RESID_V2 for the joined side;</li>
 *   <li>a reference OR-list joined to another table (`Flag?subject=<100 refs>&_tag=`: H2 drives from the tag and
 *       reads every link of the 100 patients once per tagged resource): {@link #EXTRA_INDEX} gives the joined side a
 *       covering index that leads with the join key;</li>
 *   <li>`_revinclude=DiagnosticReport:result` (`target_resource_id IN (...) AND target_resource_type = ?`: the
 *       type equality disables the IN, so every page of results reads all of HFJ_RES_LINK): {@link #inspect} turns
 *       the type test into an expression that H2 filters on instead of seeking with;</li>
 *   <li>HAPI's id lookup before writes ({@code (res_type=? and fhir_id=?) or ...}: H2 cannot use an index for an OR
 *       of ANDs and reads all of HFJ_RESOURCE): {@link #inspect} writes each pair as a row value, which H2 turns
 *       into one {@code IN} seek.</li>
 * </ul>
 * Each rewrite keeps the statement's meaning and its parameters (count and order). PostgreSQL (production) plans
 * these statements well without help. {@link #checkPlans} asks H2 for its plan of each shape at start-up.
 */
public class H2QueryPlans implements StatementInspector {

	private static final Logger log = LoggerFactory.getLogger(H2QueryPlans.class);

	/** Joined reference lookups by source resource; H2 prefers it to IDX_RL_TGT_V2 (fewer unused columns). */
	static final String EXTRA_INDEX = "CREATE INDEX IF NOT EXISTS IDX_LEUKOFHIR_RL_SRC_PATH_TGT"
			+ " ON HFJ_RES_LINK(SRC_RESOURCE_ID, SRC_PATH, TARGET_RESOURCE_ID)";

	// SearchBuilder.loadIncludesMatchSpecific (HAPI 8.8): "AND r.target_resource_type = :target_resource_type".
	// TARGET_RESOURCE_TYPE is NOT NULL, so CONCAT(x, '') = ? selects the same rows.
	private static final Pattern INCLUDE_TYPE = Pattern.compile("\\br\\.target_resource_type = \\?");
	// IdHelperService.resolveResourceIdentitiesForFhirIdsUsingDatabase, as Hibernate 6 writes its criteria query.
	private static final Pattern ID_PAIR = Pattern.compile("\\b(\\w+)\\.res_type=\\? and \\1\\.fhir_id=\\?");

	@Override
	public String inspect(String sql) {
		if (sql.contains(" FROM hfj_res_link r WHERE ")) {
			return INCLUDE_TYPE.matcher(sql).replaceAll("CONCAT(r.target_resource_type, '') = ?");
		}
		if (sql.startsWith("select ") && sql.contains(" from hfj_resource ")) {
			return ID_PAIR.matcher(sql).replaceAll("($1.res_type,$1.fhir_id)=(?,?)");
		}
		return sql;
	}

	/** Creates {@link #EXTRA_INDEX}, once per database (about 2 s on an existing database of 70,000 links). */
	static void createIndex(DataSource dataSource) throws SQLException {
		try (Connection connection = dataSource.getConnection(); Statement statement = connection.createStatement()) {
			statement.execute(EXTRA_INDEX);
		}
	}

	/**
	 * What the pipeline's searches need from H2, as HAPI 8.8 writes them (IN lists shortened): a token OR-list and a
	 * reference OR-list each read by the join key when their table is joined (here t1 is found by its unique type and
	 * id, so the other table must be the joined one, whatever the statistics), the reports that list a page of
	 * results (`_revinclude`), and an id lookup.
	 */
	static Map<String, String> shapes(boolean hashIdentityForTokens) {
		String resource = "SELECT t1.RES_ID FROM HFJ_RESOURCE t1 INNER JOIN ";
		String byId = " WHERE (t1.RES_TYPE = ?) AND (t1.FHIR_ID = ?) AND ";
		Map<String, String> shapes = new LinkedHashMap<>();
		shapes.put("joined token OR-list", resource + "HFJ_SPIDX_TOKEN t0 ON (t1.RES_ID = t0.RES_ID)" + byId
				+ (hashIdentityForTokens ? "((t0.HASH_IDENTITY = ?) AND (t0.HASH_SYS_AND_VALUE IN (?,?) ))"
						: "(t0.HASH_SYS_AND_VALUE IN (?,?) )"));
		shapes.put("joined reference OR-list", resource + "HFJ_RES_LINK t0 ON (t1.RES_ID = t0.SRC_RESOURCE_ID)" + byId
				+ "((t0.SRC_PATH = ?) AND (t0.TARGET_RESOURCE_ID IN (?,?) ))");
		shapes.put("_revinclude", "SELECT r.src_resource_id AS resource_id FROM hfj_res_link r WHERE"
				+ " r.src_path = ? AND r.target_resource_id IN (?,?) AND r.target_resource_type = ?"
				+ " fetch first ? rows only");
		shapes.put("id lookup", "select rt1_0.res_id,rt1_0.res_type,rt1_0.fhir_id,rt1_0.res_deleted_at,"
				+ "rt1_0.partition_id from hfj_resource rt1_0 where (rt1_0.res_type=? and rt1_0.fhir_id=? or"
				+ " rt1_0.res_type=? and rt1_0.fhir_id=?)");
		return shapes;
	}

	/** The start-up check's outcome: each shape whose plan has problems, with them (empty when all are fine). */
	public record PlanCheck(Map<String, List<String>> problems) {
	}

	// One table access in H2's EXPLAIN output: "/* PUBLIC.INDEX_NAME: CONDITION\n AND CONDITION ... */".
	private static final Pattern ACCESS = Pattern.compile("/\\* PUBLIC\\.([\\w.]+)(?:: ([^*]*))?\\s*\\*/");

	/**
	 * What is wrong with one plan: a table or an index read whole, an IN list that H2 ignores (another condition of
	 * the same index comes first), or an IN seek that drops the join key (a later condition names a joined table).
	 */
	static List<String> problems(String plan) {
		List<String> problems = new ArrayList<>();
		Matcher access = ACCESS.matcher(plan);
		while (access.find()) {
			String index = access.group(1);
			List<String> conditions = access.group(2) == null ? List.of()
					: List.of(access.group(2).trim().split("\\s+AND\\s+"));
			int in = -1;
			for (int i = 0; i < conditions.size() && in < 0; i++) {
				if (conditions.get(i).contains(" IN(")) {
					in = i;
				}
			}
			if (index.endsWith(".tableScan") || conditions.isEmpty()) {
				problems.add("reads all of " + index.replace(".tableScan", ""));
			} else if (in > 0) {
				problems.add(index + " ignores its IN list (" + conditions.get(0) + " comes first)");
			} else if (in == 0 && conditions.stream().skip(1).anyMatch(c -> c.matches(".*= T\\d+\\..*"))) {
				problems.add(index + " seeks on its IN list alone and drops the join key");
			}
		}
		return problems;
	}

	/**
	 * H2's plan for each of {@link #shapes}, after {@code inspector} (the statement inspector Hibernate really uses;
	 * null for none): logs one line "H2 query plans: ... ok", or a warning per shape with its problems and its plan
	 * (a HAPI or H2 upgrade may change them). Returns the shapes with problems.
	 */
	static Map<String, List<String>> checkPlans(
			DataSource dataSource, StatementInspector inspector, boolean hashIdentityForTokens) {
		Map<String, List<String>> found = new LinkedHashMap<>();
		Map<String, String> shapes = shapes(hashIdentityForTokens);
		try (Connection connection = dataSource.getConnection(); Statement statement = connection.createStatement()) {
			for (Map.Entry<String, String> shape : shapes.entrySet()) {
				String sql = inspector == null ? shape.getValue() : inspector.inspect(shape.getValue());
				String plan;
				try (ResultSet rows = statement.executeQuery("EXPLAIN " + sql)) {
					plan = rows.next() ? rows.getString(1) : "";
				}
				// A plan this check cannot read must not pass as a good one.
				List<String> problems = ACCESS.matcher(plan).find() ? problems(plan)
						: List.of("no table access found in the plan");
				if (!problems.isEmpty()) {
					found.put(shape.getKey(), problems);
					log.warn("H2 query plan for {}: {}. Plan: {}", shape.getKey(), String.join("; ", problems),
							plan.replaceAll("\\s+", " "));
				}
			}
		} catch (SQLException e) {
			log.warn("H2 query plans could not be checked: {}", e.getMessage());
			found.put("(check)", List.of(String.valueOf(e.getMessage())));
			return found;
		}
		if (found.isEmpty()) {
			log.info("H2 query plans: {} ok", String.join(", ", shapes.keySet()));
		}
		return found;
	}
}
