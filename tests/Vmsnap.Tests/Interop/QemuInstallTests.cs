using System.Reflection;
using Xunit.Abstractions;
using Xunit.Sdk;

namespace Vmsnap.Tests.Interop;

/// <summary>
/// Both QEMU versions are there; [QemuFact] and [QemuTheory] make one test case per version (of each row), and each
/// test case's version is the one in use in its class's constructor, its body, after its awaits and in its tasks.
/// </summary>
[Trait("Category", "Interop")]
public sealed class QemuInstallTests(QemuInstallTests.MadeOutsideTests outsideTests, ITestOutputHelper output) : IClassFixture<QemuInstallTests.MadeOutsideTests>
{
    /// <summary>The QEMU in use while xunit constructs the test class (once per test, so under each test's version).</summary>
    private readonly string? _versionAtConstruction = VersionInUse();

    /// <summary>A class fixture, made once before any test of the class: no version.</summary>
    public sealed class MadeOutsideTests
    {
        public string? Version { get; } = VersionInUse();
    }

    private static string? VersionInUse()
    {
        try { return QemuInstall.Current.Version; } catch (InvalidOperationException) { return null; }
    }

    /// <summary>The test case xunit runs now (its output helper knows the test).</summary>
    private ITestCase RunningTestCase()
    {
        FieldInfo field = output.GetType().GetFields(BindingFlags.Instance | BindingFlags.NonPublic).Single(f => f.FieldType == typeof(ITest));
        return ((ITest)field.GetValue(output)!).TestCase;
    }

    [QemuFact]
    public void Each_version_runs_its_own_programs()
    {
        string version = QemuInstall.Current.Version;
        foreach (string program in new[] { "qemu-img", "qemu-io", "qemu-system-x86_64" })
        {
            Tool.Result r = Tool.Run(program, ["--version"]);
            Assert.Equal(0, r.ExitCode);
            Assert.Contains($"version {version}.", r.Stdout);
        }
        // The machine types the tests use exist in this version.
        string machines = Tool.Check("qemu-system-x86_64", "-machine", "help");
        Assert.Contains(QemuInstall.Current.PcMachine, machines);
        Assert.Contains(QemuInstall.Current.Q35Machine, machines);
    }

    [QemuFact]
    public async Task The_test_cases_version_is_in_use_in_the_constructor_the_body_after_awaits_and_in_tasks()
    {
        var testCase = Assert.IsType<QemuTestCase>(RunningTestCase());
        string version = testCase.QemuVersion;
        Assert.EndsWith($"(version: \"{version}\")", testCase.DisplayName);
        Assert.Equal(version, _versionAtConstruction);
        Assert.Null(outsideTests.Version);
        Assert.Equal(version, QemuInstall.Current.Version);
        await Task.Yield();
        Assert.Equal(version, QemuInstall.Current.Version);
        await Task.Delay(1).ConfigureAwait(false);   // resumes on whatever thread: the version comes along
        Assert.Equal(version, QemuInstall.Current.Version);
        Assert.Equal(QemuInstall.Get(version).Path("qemu-img"), await Task.Run(() => Tool.Find("qemu-img")));
    }

    [QemuTheory]
    [InlineData("a", 1)]
    [InlineData("b", 2)]
    public void A_theorys_rows_each_run_on_each_version_named_first(string row, int n)
    {
        var testCase = Assert.IsType<QemuTestCase>(RunningTestCase());
        Assert.Equal(testCase.QemuVersion, QemuInstall.Current.Version);
        Assert.EndsWith($"(version: \"{testCase.QemuVersion}\", row: \"{row}\", n: {n})", testCase.DisplayName);
    }

    [QemuFact(Since = "10.0")]
    public void A_test_since_a_version_runs_from_it_on() =>
        Assert.True(QemuInstall.Current.AtLeast(10, 0));

    [Fact]
    public void The_discoverers_make_one_test_case_per_version_and_row_and_refuse_what_cannot_hold_a_version()
    {
        var cases = QemuDiscovery.Discover(typeof(QemuInstallTests), nameof(Each_version_runs_its_own_programs));
        Assert.Equal(QemuInstall.All.Select(i => i.Version), cases.Select(c => Assert.IsType<QemuTestCase>(c).QemuVersion));
        Assert.Equal(2 * QemuInstall.All.Count, QemuDiscovery.Discover(typeof(QemuInstallTests), nameof(A_theorys_rows_each_run_on_each_version_named_first)).OfType<QemuTestCase>().Select(c => c.UniqueID).Distinct().Count());
        Assert.Equal(["10.0"], QemuDiscovery.Discover(typeof(QemuInstallTests), nameof(A_test_since_a_version_runs_from_it_on)).Select(c => ((QemuTestCase)c).QemuVersion));
        Assert.IsType<ExecutionErrorTestCase>(Assert.Single(QemuDiscovery.Discover(typeof(Shapes), nameof(Shapes.A_fact_with_a_parameter))));
        Assert.IsType<ExecutionErrorTestCase>(Assert.Single(QemuDiscovery.Discover(typeof(Shapes), nameof(Shapes.A_skipped_one))));
    }

    /// <summary>Methods the discoverers must refuse (a private class: xunit does not look for tests in it).</summary>
#pragma warning disable xUnit1000
    private static class Shapes
#pragma warning restore xUnit1000
    {
        [QemuFact]
        public static void A_fact_with_a_parameter(int n) => _ = n;

        [QemuFact(Skip = "no")]
        public static void A_skipped_one() { }
    }

    [Fact]
    public void A_test_that_is_neither_has_no_QEMU()
    {
        Assert.Null(_versionAtConstruction);
        // Refused, not quietly taken from 7.2.
        Assert.Throws<InvalidOperationException>(() => QemuInstall.Current);
        Assert.Throws<InvalidOperationException>(() => Tool.Find("qemu-img"));
    }

    [Fact]
    public async Task A_choice_follows_the_test_into_its_tasks_and_ends_with_it()
    {
        using (QemuInstall.Use("10.0"))
        {
            string inTask = await Task.Run(() => Tool.Find("qemu-img"));
            Assert.Contains("qemu-10.0", inTask);
        }
        // Once the choice ends, nothing is chosen: a QEMU program is refused, not quietly taken from 7.2.
        Assert.Throws<InvalidOperationException>(() => Tool.Find("qemu-img"));
    }
}

/// <summary>Runs the [QemuFact]/[QemuTheory] discoverers over one method, as xunit does when it looks for tests.</summary>
internal static class QemuDiscovery
{
    internal static List<IXunitTestCase> Discover(Type type, string method)
    {
        var testClass = new TestClass(new TestCollection(new TestAssembly(Reflector.Wrap(type.Assembly)), null, "c"), Reflector.Wrap(type));
        var testMethod = new TestMethod(testClass, Reflector.Wrap(type.GetMethod(method, BindingFlags.Public | BindingFlags.Static | BindingFlags.Instance)!));
        IAttributeInfo attribute = testMethod.Method.GetCustomAttributes(typeof(FactAttribute)).Single();
        IXunitTestCaseDiscoverer discoverer = attribute.GetNamedArgument<string?>("Skip") is null && testMethod.Method.GetCustomAttributes(typeof(TheoryAttribute)).Any()
            ? new QemuTheoryDiscoverer(new NullMessageSink())
            : new QemuFactDiscoverer(new NullMessageSink());
        return discoverer.Discover(new DiscoveryOptions(), testMethod, attribute).ToList();
    }

    private sealed class DiscoveryOptions : ITestFrameworkDiscoveryOptions
    {
        public TValue GetValue<TValue>(string name) => default!;

        public void SetValue<TValue>(string name, TValue value) { }
    }
}
