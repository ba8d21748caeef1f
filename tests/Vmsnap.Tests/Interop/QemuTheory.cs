using Xunit.Abstractions;
using Xunit.Sdk;

namespace Vmsnap.Tests.Interop;

/// <summary>
/// An interop test without data: runs once per QEMU version (<see cref="QemuInstall.All"/>), that version in use for
/// the whole test (<see cref="QemuInstall.Current"/>): its class's constructor, its body and the tasks it starts reach
/// that version's qemu-img, qemu-io and qemu-system-x86_64. The display name says which QEMU ran
/// (<c>T(version: "10.0")</c>). A test that starts a QEMU program without this or <see cref="QemuTheoryAttribute"/>
/// fails at once.
/// </summary>
[XunitTestCaseDiscoverer("Vmsnap.Tests.Interop.QemuFactDiscoverer", "Vmsnap.Tests")]
[AttributeUsage(AttributeTargets.Method)]
public sealed class QemuFactAttribute : FactAttribute
{
    /// <summary>The oldest version the test runs on ("10.0": mapped-ram and current machine types need QEMU 9.0+).</summary>
    public string? Since { get; set; }

    /// <summary>An environment variable that, set to 1, runs the test on every version despite <see cref="Since"/> (for slow tests).</summary>
    public string? AllVersionsWhen { get; set; }
}

/// <summary>
/// An interop test with data (<c>[InlineData]</c>, <c>[MemberData]</c>): each row once per QEMU version, as
/// <see cref="QemuFactAttribute"/> (<c>T(version: "10.0", x: ...)</c>).
/// </summary>
[XunitTestCaseDiscoverer("Vmsnap.Tests.Interop.QemuTheoryDiscoverer", "Vmsnap.Tests")]
[AttributeUsage(AttributeTargets.Method)]
public sealed class QemuTheoryAttribute : TheoryAttribute
{
    /// <inheritdoc cref="QemuFactAttribute.Since"/>
    public string? Since { get; set; }

    /// <inheritdoc cref="QemuFactAttribute.AllVersionsWhen"/>
    public string? AllVersionsWhen { get; set; }
}

/// <summary>The versions one [QemuFact] or [QemuTheory] runs on, and its test cases.</summary>
internal static class QemuTestCases
{
    internal static IEnumerable<IXunitTestCase> Make(IMessageSink sink, ITestFrameworkDiscoveryOptions options, ITestMethod testMethod, IAttributeInfo attribute, object[]? dataRow)
    {
        if (attribute.GetNamedArgument<string?>(nameof(FactAttribute.Skip)) is not null)
            return [Error(sink, options, testMethod, "interop tests are never skipped")];
        string? since = attribute.GetNamedArgument<string?>(nameof(QemuFactAttribute.Since));
        string? allWhen = attribute.GetNamedArgument<string?>(nameof(QemuFactAttribute.AllVersionsWhen));
        IEnumerable<QemuInstall> versions = QemuInstall.All;
        if (since is not null && !(allWhen is not null && Environment.GetEnvironmentVariable(allWhen) == "1"))
        {
            var oldest = Version.Parse(since);
            versions = versions.Where(i => i.AtLeast(oldest.Major, oldest.Minor));
        }
        return versions.Select(IXunitTestCase (i) => new QemuTestCase(sink, options.MethodDisplayOrDefault(), options.MethodDisplayOptionsOrDefault(), testMethod, i.Version, dataRow)).ToList();
    }

    internal static ExecutionErrorTestCase Error(IMessageSink sink, ITestFrameworkDiscoveryOptions options, ITestMethod testMethod, string message) =>
        new(sink, options.MethodDisplayOrDefault(), options.MethodDisplayOptionsOrDefault(), testMethod, message);
}

/// <summary>Makes the test cases of a <see cref="QemuFactAttribute"/>: one per version.</summary>
public sealed class QemuFactDiscoverer(IMessageSink diagnosticMessageSink) : FactDiscoverer(diagnosticMessageSink)
{
    /// <inheritdoc/>
    public override IEnumerable<IXunitTestCase> Discover(ITestFrameworkDiscoveryOptions discoveryOptions, ITestMethod testMethod, IAttributeInfo factAttribute) =>
        testMethod.Method.GetParameters().Any()
            ? [QemuTestCases.Error(DiagnosticMessageSink, discoveryOptions, testMethod, "a [QemuFact] takes no parameters; its version is QemuInstall.Current")]
            : QemuTestCases.Make(DiagnosticMessageSink, discoveryOptions, testMethod, factAttribute, dataRow: null);
}

/// <summary>Makes the test cases of a <see cref="QemuTheoryAttribute"/>: each data row once per version.</summary>
public sealed class QemuTheoryDiscoverer(IMessageSink diagnosticMessageSink) : TheoryDiscoverer(diagnosticMessageSink)
{
    /// <inheritdoc/>
    protected override IEnumerable<IXunitTestCase> CreateTestCasesForDataRow(ITestFrameworkDiscoveryOptions discoveryOptions, ITestMethod testMethod, IAttributeInfo theoryAttribute, object[] dataRow) =>
        QemuTestCases.Make(DiagnosticMessageSink, discoveryOptions, testMethod, theoryAttribute, dataRow);

    /// <inheritdoc/>
    protected override IEnumerable<IXunitTestCase> CreateTestCasesForTheory(ITestFrameworkDiscoveryOptions discoveryOptions, ITestMethod testMethod, IAttributeInfo theoryAttribute) =>
        [QemuTestCases.Error(DiagnosticMessageSink, discoveryOptions, testMethod, "a [QemuTheory]'s rows must be serializable and pre-enumerated: each version of each row is its own test case")];

    /// <inheritdoc/>
    protected override IEnumerable<IXunitTestCase> CreateTestCasesForSkip(ITestFrameworkDiscoveryOptions discoveryOptions, ITestMethod testMethod, IAttributeInfo theoryAttribute, string skipReason) =>
        [QemuTestCases.Error(DiagnosticMessageSink, discoveryOptions, testMethod, "interop tests are never skipped")];

    /// <inheritdoc/>
    protected override IEnumerable<IXunitTestCase> CreateTestCasesForSkippedDataRow(ITestFrameworkDiscoveryOptions discoveryOptions, ITestMethod testMethod, IAttributeInfo theoryAttribute, object[] dataRow, string skipReason) =>
        [QemuTestCases.Error(DiagnosticMessageSink, discoveryOptions, testMethod, "interop tests are never skipped")];
}

/// <summary>One test case of a [QemuFact] or [QemuTheory]: one version (of one data row); runs with that version in use.</summary>
public sealed class QemuTestCase : XunitTestCase
{
    /// <summary>For the deserializer.</summary>
    [Obsolete("Called by the de-serializer; should only be called by deriving classes for de-serialization purposes", error: true)]
    public QemuTestCase() { }

    /// <summary>A test case of <paramref name="testMethod"/> on QEMU <paramref name="version"/>, with <paramref name="testMethodArguments"/> if a theory.</summary>
    public QemuTestCase(IMessageSink diagnosticMessageSink, TestMethodDisplay defaultMethodDisplay, TestMethodDisplayOptions defaultMethodDisplayOptions, ITestMethod testMethod, string version, object[]? testMethodArguments)
        : base(diagnosticMessageSink, defaultMethodDisplay, defaultMethodDisplayOptions, testMethod, testMethodArguments) =>
        QemuVersion = version;

    /// <summary>"7.2" or "10.0".</summary>
    public string QemuVersion { get; private set; } = "";

    /// <summary>
    /// Names the version as the first argument was named before the fixture existed: <c>T(version: "10.0", ...)</c>.
    /// Its tier (trait Category) is Interop, whatever its class's tier for the tests that need no QEMU, unless the
    /// class's is Guest (tests that boot a real guest).
    /// </summary>
    protected override void Initialize()
    {
        base.Initialize();
        if (!(Traits.TryGetValue(Tier.Category, out List<string>? tiers) && tiers.Contains(Tier.Guest)))
            Traits[Tier.Category] = [Tier.Interop];
        string version = $"version: \"{QemuVersion}\"";
        DisplayName = DisplayName.EndsWith(')') && TestMethodArguments is { Length: > 0 }
            ? DisplayName.Insert(DisplayName.IndexOf('(', BaseDisplayName.Length) + 1, version + ", ")
            : $"{DisplayName}({version})";
    }

    /// <inheritdoc/>
    protected override string GetUniqueID() => $"{base.GetUniqueID()}-qemu-{QemuVersion}";

    /// <inheritdoc/>
    public override void Serialize(IXunitSerializationInfo data)
    {
        data.AddValue(nameof(QemuVersion), QemuVersion);
        base.Serialize(data);
    }

    /// <inheritdoc/>
    public override void Deserialize(IXunitSerializationInfo data)
    {
        QemuVersion = data.GetValue<string>(nameof(QemuVersion));
        base.Deserialize(data);
    }

    /// <summary>
    /// Runs the test with its version in use. The version lives in an AsyncLocal set here, before xunit creates the
    /// test class and invokes the method further down this same async flow, so the class, the method and the tasks
    /// it starts see it; the caller's flow does not (an async method's changes to its context end with it). A missing
    /// or wrong QEMU fails the test before it starts.
    /// </summary>
    public override async Task<RunSummary> RunAsync(IMessageSink diagnosticMessageSink, IMessageBus messageBus, object[] constructorArguments, ExceptionAggregator aggregator, CancellationTokenSource cancellationTokenSource)
    {
        QemuInstall? install = null;
        aggregator.Run(() => install = QemuInstall.Get(QemuVersion));
        aggregator.Run(() => install?.Path("qemu-img"));
        QemuInstall.Enter(install);
        return await base.RunAsync(diagnosticMessageSink, messageBus, constructorArguments, aggregator, cancellationTokenSource);
    }
}
